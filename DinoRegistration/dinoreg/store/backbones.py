"""Where DINO weights live: resolving a model spec, caches, download, clearing, availability.

A *model spec* is what a user writes for ``model``: a registry name (``dinov2_vits14_reg``), a
Hugging Face hub id (``facebook/dinov2-with-registers-small``), a local Hugging Face model folder
(``config.json`` + ``model.safetensors``) or one of Meta's original ``.pth`` checkpoints.

Caches:
- hub downloads go to the standard Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
  else ``~/.cache/huggingface/hub``), shared with every other Hugging Face tool;
- Meta checkpoints downloaded by ``dinoreg weights download NAME --source meta`` and their
  conversions to the Hugging Face layout go to ``$DINOREG_CACHE/dino`` (default
  ``~/.cache/dinoreg/dino``).

Everything here except :func:`download_model` is cheap: no torch, no transformers, no network.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dinoreg.errors import InputError, one_line
from dinoreg.requirements import Availability, missing_family_message
from dinoreg.store.locations import backbones_dir, cache_root
from dinoreg.store.backbone_catalog import ModelEntry, find_model, known_models
from dinoreg.store.downloads import check_recorded_hash, download_verified, verify_hub_snapshot

DEFAULT_MODEL = "facebook/dinov2-with-registers-small"
DOWNLOAD_COMMAND = "dinoreg weights download"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------------------------
# cache locations


def dinoreg_cache_dir() -> Path:
    """Root of our own cache (``store.locations.cache_root``)."""
    return cache_root()


def dino_cache_dir() -> Path:
    """Our DINO weights: ``<dinoreg cache>/dino`` (``meta/`` downloads, ``converted/`` HF folders)."""
    return backbones_dir()


def converted_dir(entry: ModelEntry) -> Path:
    """Hugging Face folder converted from Meta's checkpoint of a registry entry."""
    return dino_cache_dir() / "converted" / entry.name


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (now, or when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def is_hf_folder(path: Path) -> bool:
    """A complete Hugging Face model folder: ``config.json`` and a weights file."""
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def hub_repo_cache(repo_id: str) -> Path:
    """Folder of one hub repository inside the Hugging Face cache (it may not exist)."""
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hub_snapshot_dir(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` (``refs/main``, else the newest complete one), or None."""
    repo = hub_repo_cache(repo_id)
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if is_hf_folder(snapshot):
            return snapshot
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        complete = [path for path in snapshots.iterdir() if is_hf_folder(path)]
        if complete:
            return max(complete, key=lambda path: path.stat().st_mtime)
    return None


def installed_path(entry: ModelEntry) -> Path | None:
    """Where a registry model is installed (our converted folder first, then the hub cache)."""
    converted = converted_dir(entry)
    if is_hf_folder(converted):
        return converted
    return hub_snapshot_dir(entry.hub_id)


# ----------------------------------------------------------------------------------------------
# resolving a model spec


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. ``kind`` is ``hf_folder``, ``meta_checkpoint`` or ``hub``
    (a hub id that is not in the cache yet); ``location`` is a path, or the hub id for ``hub``."""

    spec: str
    kind: str
    location: str
    entry: ModelEntry | None = None

    @property
    def installed(self) -> bool:
        return self.kind != "hub"

    @property
    def hub_id(self) -> str | None:
        if self.entry is not None:
            return self.entry.hub_id
        return self.spec if HUB_ID_PATTERN.match(self.spec) and not Path(self.spec).exists() else None

    @property
    def fetch_name(self) -> str:
        """What to pass to ``dinoreg weights download`` to fetch this model."""
        return self.entry.name if self.entry is not None else (self.hub_id or self.spec)


def looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", ".", "~", "\\")) or spec.lower().endswith(CHECKPOINT_SUFFIXES)
            or (len(spec) > 1 and spec[1] == ":") or spec.count("/") > 1 or "\\" in spec)


def resolve_model(spec: str | None) -> ModelSource:
    """Find what ``spec`` refers to, without network access or heavy imports.

    Raises ``InputError`` (one line) for a local path that does not exist or is not a model, and
    for a name that is neither in the registry nor a hub id.
    """
    spec = (spec or "").strip() or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(spec, path)
    entry = find_model(spec)
    if entry is not None and not looks_like_path(spec):
        installed = installed_path(entry)
        if installed is not None:
            return ModelSource(spec, "hf_folder", str(installed), entry)
        return ModelSource(spec, "hub", entry.hub_id, entry)
    if looks_like_path(spec):
        hint = find_model(path.name)
        fetch = (f"fetch it with: {DOWNLOAD_COMMAND} {hint.name}" if hint is not None
                 else "give an existing .pth file or model folder, or a known name (dinoreg weights list)")
        raise InputError(f"DINO model file not found: {path}; {fetch}")
    if HUB_ID_PATTERN.match(spec):
        snapshot = hub_snapshot_dir(spec)
        if snapshot is not None:
            return ModelSource(spec, "hf_folder", str(snapshot))
        return ModelSource(spec, "hub", spec)
    names = ", ".join(entry.name for entry in known_models())
    raise InputError(f"unknown DINO model '{spec}': use a registry name ({names}), a Hugging Face hub id, "
                     "a model folder or a .pth checkpoint (see: dinoreg weights list)")


def _local_source(spec: str, path: Path) -> ModelSource:
    entry = find_model(path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is not a Hugging Face model folder (no config.json): give the folder that holds "
                             "config.json and model.safetensors, or a .pth checkpoint file")
        return ModelSource(spec, "hf_folder", str(path), entry)
    if not path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        raise InputError(f"{path} is not a model checkpoint: expected a .pth/.pt/.safetensors file or a model folder")
    return ModelSource(spec, "meta_checkpoint", str(path), entry)


def missing_model_message(source: ModelSource) -> str:
    """One line: which model is missing, where we looked, and the command that fetches it."""
    hub_id = source.hub_id or source.location
    label = source.spec if source.spec == hub_id else f"{source.spec} ({hub_id})"
    places = f"{hub_repo_cache(hub_id)}"
    if source.entry is not None:
        places += f" and {converted_dir(source.entry)}"
    offline = " (HF_HUB_OFFLINE is set, so nothing is downloaded now)" if hub_offline() else ""
    return (f"DINO model {label} is not downloaded{offline}: looked in {places}; "
            f"fetch it with: {DOWNLOAD_COMMAND} {source.fetch_name}")


def dino_availability(model: str | None = None) -> Availability:
    """Whether ``model`` can be loaded now without a download. Cheap: no torch or model loading."""
    lacking = missing_family_message("dino", "DINO features")
    if lacking:
        return Availability(False, lacking)
    try:
        source = resolve_model(model)
    except InputError as error:
        return Availability(False, str(error))
    if not source.installed:
        return Availability(False, missing_model_message(source))
    return Availability(True)


# ----------------------------------------------------------------------------------------------
# download and clean-up (network and heavy imports happen only here)


def download_model(spec: str, source: str = "hub", convert: Callable[[Path, Path], Path] | None = None) -> Path:
    """Fetch a model into the cache and return its local folder.

    ``source="hub"`` downloads a hub repository (registry name or any hub id) into the Hugging Face
    cache, with progress bars on stderr. ``source="meta"`` downloads Meta's original ``.pth`` of a
    registry entry into ``<dinoreg cache>/dino/meta`` and converts it to a Hugging Face folder in
    ``<dinoreg cache>/dino/converted/NAME`` with ``convert(checkpoint, folder)`` (the feature layer's
    converter, ``features.dino.backbones.save_converted_checkpoint``: the store holds files, not models).
    """
    entry = find_model(spec)
    if source == "meta":
        if entry is None or not entry.meta_url:
            known = ", ".join(e.name for e in known_models() if e.meta_url)
            raise InputError(f"no Meta checkpoint is known for '{spec}': --source meta works for {known}")
        if convert is None:
            raise ValueError("download_model(source='meta') needs convert=save_converted_checkpoint")
        return _download_meta(entry, convert)
    if source != "hub":
        raise InputError(f"unknown download source '{source}': use hub or meta")
    repo_id = entry.hub_id if entry is not None else spec
    if not HUB_ID_PATTERN.match(repo_id):
        raise InputError(f"'{spec}' is neither a known model (dinoreg weights list) nor a Hugging Face hub id (org/name)")
    return _download_hub(repo_id, entry)


def _download_hub(repo_id: str, entry: ModelEntry | None) -> Path:
    if hub_offline():
        raise InputError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it on a machine with internet, "
                         f"or copy the model folder here and give its path")
    from huggingface_hub import HfApi, snapshot_download  # optional: only when downloading DINO weights
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError  # optional: as above

    cache = hf_cache_dir()
    try:
        files = HfApi().list_repo_files(repo_id)
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        folder = Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=["*.json", *weights]))
    except GatedRepoError:
        raise InputError(f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, log in with "
                         f"'hf auth login', then run: {DOWNLOAD_COMMAND} {entry.name if entry else repo_id}") from None
    except RepositoryNotFoundError:
        raise InputError(f"no model {repo_id} on the Hugging Face hub (or it is private): check the id") from None
    except Exception as error:  # network, disk, proxy
        raise InputError(f"could not download {repo_id} into {cache}: {one_line(error)}; check the internet "
                         f"connection and retry: {DOWNLOAD_COMMAND} {entry.name if entry else repo_id}") from None
    if not is_hf_folder(folder):
        raise InputError(f"{repo_id} has no config.json and weights file: it is not a transformers model")
    verify_hub_snapshot(folder)
    return folder


def _download_meta(entry: ModelEntry, convert: Callable[[Path, Path], Path]) -> Path:
    meta_dir = dino_cache_dir() / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = meta_dir / str(entry.meta_filename)
    if not checkpoint.is_file():
        try:
            download_verified(str(entry.meta_url), checkpoint, getattr(entry, "meta_sha256", None))
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"could not download {entry.meta_url}: {one_line(error)}; check the internet "
                             f"connection and retry: {DOWNLOAD_COMMAND} {entry.name} --source meta") from None
    check_recorded_hash(checkpoint)
    target = converted_dir(entry)
    convert(checkpoint, target)
    return target


def clear_cache(include_hub: bool = False) -> list[Path]:
    """Delete our DINO cache (``<dinoreg cache>/dino``); with ``include_hub`` also the Hugging Face
    cache folders of the registry models. Returns the folders removed (files only: models already
    loaded in memory are the feature layer's, see ``features.dino.backbones.clear_cache``)."""
    removed = []
    targets = [dino_cache_dir()]
    if include_hub:
        targets += [hub_repo_cache(entry.hub_id) for entry in known_models()]
    for folder in targets:
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed

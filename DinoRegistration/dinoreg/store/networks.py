"""Which trained models exist, where their files are, and fetching/checking/clearing them.

Three sources:
- ``shipped``: listed in ``networks.json`` next to this file, files in ``store/shipped/`` (in the
  repository and the wheel: available on a fresh clone with no download);
- ``download``: listed in ``networks.json`` with ``url`` (the .safetensors), ``card_url`` (the .json),
  ``sha256`` and ``size``; fetched into :func:`models_dir` by :func:`download_model`;
- ``local``: any other ``<name>.json`` + weights found in :func:`models_dir` (e.g. saved by
  ``dinoreg train`` or copied there by hand).

Cheap: no torch import, no network except in :func:`download_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoreg.errors import InputError
from dinoreg.store.checkpoints import WEIGHT_SUFFIXES, read_card, read_weights, stem_paths
from dinoreg.store.downloads import download_verified, sha256_of
from dinoreg.store.locations import models_dir
import dinoreg.store.published as published  # module reference: its card list is looked up at call time

REGISTRY_FILE = Path(__file__).with_name("networks.json")
SHIPPED_DIR = Path(__file__).with_name("shipped")


@dataclass
class ModelInfo:
    """One model the engine knows: where its files are and whether they are present."""

    name: str
    architecture: str
    source: str  # shipped | download | local
    weights_path: Path
    card_path: Path
    sha256: str | None = None
    size: int | None = None
    url: str | None = None
    card_url: str | None = None

    @property
    def present(self) -> bool:
        return self.weights_path.is_file() and self.card_path.is_file()

    @property
    def fix(self) -> str:
        """What to do when the files are missing or damaged."""
        if self.source in ("download", "published"):
            return f"run 'dinoreg models download {self.name}'"
        if self.source == "shipped":
            return "restore the file from the repository (git checkout -- DinoRegistration/dinoreg/store/shipped)"
        return f"save or copy the model '{self.name}' into {self.card_path.parent} again"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "source": self.source, "present": self.present,
                "path": str(self.weights_path), "sha256": self.sha256, "size": self.size, "url": self.url}


def _registry_entries() -> list[dict[str, Any]]:
    try:
        data = json.loads(REGISTRY_FILE.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"the model registry '{REGISTRY_FILE}' is unreadable ({error}): reinstall dinoreg") from None
    return list(data.get("models", []))


def list_models() -> list[ModelInfo]:
    """Every known model: registry entries (shipped, download) first, then local models."""
    infos: list[ModelInfo] = []
    for entry in _registry_entries():
        name, source = str(entry["name"]), str(entry.get("source", "download"))
        folder = SHIPPED_DIR if source == "shipped" else models_dir()
        infos.append(ModelInfo(name, str(entry.get("architecture", "?")), source, folder / f"{name}.safetensors",
                               folder / f"{name}.json", entry.get("sha256"), entry.get("size"), entry.get("url"),
                               entry.get("card_url")))
    infos.extend(_published_infos())
    known = {info.name for info in infos}
    folder = models_dir()
    if folder.is_dir():
        for card_file in sorted(folder.glob("*.json")):
            name = card_file.stem
            if name in known:
                continue
            try:
                card = json.loads(card_file.read_text())
            except (OSError, ValueError):
                card = {}
            weights = next((card_file.with_suffix(s) for s in (".safetensors", ".pth", ".pt")
                            if card_file.with_suffix(s).exists()), card_file.with_suffix(".safetensors"))
            infos.append(ModelInfo(name, str(card.get("architecture", "?")), "local", weights, card_file,
                                   card.get("weights_sha256"), card.get("weights_bytes")))
    return infos


def _published_infos() -> list[ModelInfo]:
    """Published networks of other authors (``models/published``): shipped card, downloaded weights."""
    return [ModelInfo(name, str(card["architecture"]), "published", published.weights_path(name),
                      published.card_path(name), card["weights"].get("sha256"),
                      card["weights"].get("approximate_bytes"), card["weights"]["url"])
            for name, card in published.published_cards().items()]


def find_model(name: str) -> ModelInfo | None:
    """The model called ``name``, or None."""
    return next((info for info in list_models() if info.name == name), None)


def download_model(name: str, progress: Any = None) -> Path:
    """Fetch a ``download`` model into :func:`models_dir`, checked against its SHA-256; returns the card path.

    The files appear complete or not at all (temporary names, checked, then renamed).
    """
    info = find_model(name)
    if info is None:
        raise InputError(f"unknown model '{name}': 'dinoreg models list' shows the known ones")
    if info.source == "published":
        return published.download_published(name, progress)
    if info.source != "download":
        return info.card_path
    if not info.url or not info.card_url or not info.sha256:
        raise InputError(f"model '{name}' has no url, card_url or sha256 in the registry: update dinoreg")
    # the weights first (hash-checked, atomic), then the card: a model is present only with both
    download_verified(info.url, info.weights_path, info.sha256, record=False)  # the registry pins the hash
    download_verified(info.card_url, info.card_path, record=False)
    return info.card_path


def clear_models(include_local: bool = False) -> list[Path]:
    """Delete downloaded models (and local ones with ``include_local``); shipped ones stay. Returns deleted files."""
    removed = []
    for info in list_models():
        if info.source == "published":
            removed.extend(published.clear_published(info.name))
            continue
        if info.source == "download" or (include_local and info.source == "local"):
            for path in (info.weights_path, info.card_path):
                if path.exists():
                    path.unlink()
                    removed.append(path)
    return removed


def registry_entry(card_path: str | Path, source: str = "shipped", url: str | None = None,
                   card_url: str | None = None) -> dict[str, Any]:
    """The ``networks.json`` entry of a saved model (to paste into the registry when shipping it)."""
    weights, card_file = stem_paths(card_path)
    card = read_card(card_file)
    entry = {"name": card["name"], "architecture": card["architecture"], "source": source,
             "sha256": sha256_of(weights), "size": weights.stat().st_size}
    if source == "download":
        entry.update({"url": url, "card_url": card_url})
    return entry


def locate_model(name_or_path: str | Path) -> tuple[Path, Path, str | None, str]:
    """``(weights, card, expected_sha256, fix)`` of a registry model name or a model file/stem/folder.

    The one place a model reference becomes files: every reader (inference, fine-tuning, verify)
    goes through here, so the registry's SHA-256 (or the card's own) is always checked.
    """
    info = find_model(str(name_or_path)) if not _looks_like_path(name_or_path) else None
    if info is not None:
        if not info.present:
            raise InputError(f"model '{info.name}' is not installed: {info.fix}")
        return info.weights_path, info.card_path, info.sha256, info.fix
    weights_path, card_path = stem_paths(name_or_path)
    if not weights_path.exists() and not card_path.exists() and not _looks_like_path(name_or_path):
        raise InputError(f"model {str(name_or_path)!r} not found: give a .safetensors/.json file or a model name "
                         "from 'dinoreg models list'")
    return weights_path, card_path, None, "save or copy the model again (weights .safetensors and card .json with one stem)"


def read_model_files(name_or_path: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """``(state_dict, card, weights_path)`` of a model, the card checked and the weights' SHA-256 verified."""
    weights_path, card_path, expected, fix = locate_model(name_or_path)
    card = read_card(card_path)
    state = read_weights(weights_path, expected or card.get("weights_sha256"), fix)
    return state, card, weights_path


def _looks_like_path(spec: str | Path) -> bool:
    text = str(spec)
    return isinstance(spec, Path) or os.sep in text or "/" in text or text.endswith((".json", *WEIGHT_SUFFIXES)) \
        or Path(text).expanduser().exists()

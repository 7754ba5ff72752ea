"""Saving and loading models: safetensors weights + JSON model card, checked against each other.

Foreign PyTorch checkpoints (``.pth``, ``.pt``) are read only with ``torch.load(weights_only=True)``
(no code from the file is ever run) and need a card JSON with the same stem. Every failure a user
can fix is a one-line ``InputError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dinoreg import __version__
from dinoreg.errors import InputError
from dinoreg.store.cards import CARD_FORMAT, check_card, default_preprocessing
from dinoreg.store.downloads import sha256_of

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def stem_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, card) paths of a model given by its stem, weights file, card file or folder with one model."""
    path = Path(path).expanduser()
    if path.is_dir():
        cards = sorted(path.glob("*.json"))
        if len(cards) != 1:
            raise InputError(f"folder '{path}' must hold exactly one model card (.json), found {len(cards)}: "
                             "give the model's .json or .safetensors file instead")
        path = cards[0]
    stem = path.with_suffix("") if path.suffix in (".json", *WEIGHT_SUFFIXES) else path
    card = with_extension(stem, ".json")
    if path.suffix in WEIGHT_SUFFIXES:
        return path, card
    for suffix in WEIGHT_SUFFIXES:
        if with_extension(stem, suffix).exists():
            return with_extension(stem, suffix), card
    return with_extension(stem, ".safetensors"), card


def with_extension(stem: Path, extension: str) -> Path:
    """``stem`` + ``extension`` (a model name may contain dots: 'fmir.v2' -> 'fmir.v2.json')."""
    return stem.with_name(stem.name + extension)


def save_model(destination: str | Path, network: Any, card: dict[str, Any] | None = None) -> Path:
    """Write ``network``'s weights and its card; returns the card path.

    ``destination`` is a stem (``out/my-model`` -> ``out/my-model.safetensors`` + ``.json``) or an
    existing folder (the card's ``name`` is the stem). ``card`` holds what the caller knows
    (name, preprocessing, training, validation ...); architecture, config, feature identity,
    shape multiple, engine version, weight hash and size are filled in here. Both files appear
    complete or not at all (written to temporary names, then renamed).
    """
    from safetensors.torch import save_file  # lazy: only when model weights are read or written


    card = dict(card or {})
    destination = Path(destination).expanduser()
    if destination.suffix in (".json", *WEIGHT_SUFFIXES):
        destination = destination.with_suffix("")
    if destination.is_dir():
        destination = destination / str(card.get("name") or network.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    card.setdefault("name", destination.name)
    card["format"] = CARD_FORMAT
    card["architecture"] = network.name
    card["config"] = json.loads(json.dumps(network.config))
    card["features"] = {**feature_identity_with_hash(network), **card.get("features", {})}
    preprocessing = {**default_preprocessing(), **card.get("preprocessing", {})}
    preprocessing["shape_multiple"] = int(network.shape_multiple)
    card["preprocessing"] = preprocessing
    card["engine_version"] = __version__
    weights_path, card_path = with_extension(destination, ".safetensors"), with_extension(destination, ".json")
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    weights_tmp = _temporary_next_to(weights_path)
    card_tmp = _temporary_next_to(card_path)
    try:
        save_file(state, str(weights_tmp), metadata={"format": CARD_FORMAT, "architecture": network.name})
        card["weights_sha256"] = sha256_of(weights_tmp)
        card["weights_bytes"] = weights_tmp.stat().st_size
        card_tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
        os.replace(weights_tmp, weights_path)
        os.replace(card_tmp, card_path)
    finally:
        for leftover in (weights_tmp, card_tmp):
            if leftover.exists():
                leftover.unlink()
    return card_path


def feature_identity_with_hash(network: Any) -> dict[str, Any]:
    """The network's feature identity plus the SHA-256 of a DINO backbone's weight file when readable."""
    identity = dict(network.feature_identity())
    source = identity.get("source")
    if identity.get("kind") == "dino" and source:
        for candidate in (Path(source) / "model.safetensors", Path(source)):
            if candidate.is_file():
                identity["weights_sha256"] = sha256_of(candidate)
                break
    return identity


def _temporary_next_to(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=str(path.parent))
    os.close(handle)
    return Path(name)


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card at ``path`` (a .json), checked; InputError naming the file and the fix otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model card '{path}' not found: every model needs its .json card next to its weights")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"model card '{path}' is not valid JSON ({error}): restore it or save the model again") from None
    problems = check_card(card) if isinstance(card, dict) else ["not a JSON object"]
    if problems:
        raise InputError(f"model card '{path}' is unusable ({'; '.join(problems)}): save the model again with save_model")
    return card


def read_weights(path: Path, expected_sha256: str | None, fix: str) -> dict[str, Any]:
    """State dict from a .safetensors (hash checked) or a foreign .pth (``weights_only=True``)."""
    import torch  # lazy: the store imports no torch until weights are read

    if not path.is_file():
        raise InputError(f"model weights '{path}' not found: {fix}")
    if expected_sha256 and path.suffix == ".safetensors":
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise InputError(f"model weights '{path}' are corrupted or were replaced (SHA-256 {actual[:12]}... but the "
                             f"card says {expected_sha256[:12]}...): {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # lazy: only when model weights are read or written

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a checkpoint, or objects weights_only refuses
        raise InputError(f"cannot read model weights '{path}' ({type(error).__name__}: {str(error).splitlines()[0][:120]}): "
                         f"{fix}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"model weights '{path}' do not hold a state dict of tensors: {fix}")
    return state

"""The trained network as an engine model: ``model.safetensors`` + ``model.json`` (the model card).

The card records the architecture and its config, the preprocessing the network expects
(spacing, shape multiple, intensity normalisation), the training data, steps, hardware, wall
time and validation Dice. When the engine's model store (``DinoRegistrationLib.models``) is
present its ``save_model`` writes the files; otherwise they are written here in the same layout.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .config import TrainingConfig
from .networks import shape_multiple


def data_description(config: TrainingConfig) -> str:
    data = config.data
    if data.source == "synthseg":
        return (f"T1-like brains synthesised on the fly from {len(data.subjects)} SynthSeg label map(s) "
                f"(random contrast p={data.random_contrast}, random affine + diffeomorphic deformations)")
    if data.source == "random-shapes":
        return f"random-shape pairs generated on the fly ({'x'.join(str(s) for s in data.shape)} voxels)"
    return f"{data.source} {data.path}"


def model_card(config: TrainingConfig, network: torch.nn.Module, steps: int, wall_s: float, history: list,
               hardware: str, previous: dict | None = None) -> dict[str, Any]:
    """The JSON model card of a trained network."""
    from .. import __version__

    last = history[-1] if history else {}
    validation = {k: round(v, 4) for k, v in last.items() if k.startswith("dice")}
    training = {"data": data_description(config), "resolution_mm": config.data.spacing_mm, "steps": steps,
                "hardware": hardware, "wall_time_s": round(wall_s, 1),
                "losses": {k: v for k, v in vars(config.loss).items() if v},
                "optimiser": vars(config.optimiser), "seed": config.seed,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if previous:
        training["initialised_from"] = previous
    return {
        "format": "dinoreg-model/1",
        "architecture": {"name": config.network.name, "config": dict(config.network.config)},
        "feature_backend": "intensity",
        "preprocessing": {"spacing_mm": config.data.spacing_mm, "shape_multiple": shape_multiple(network),
                          "normalisation": "foreground 1st-99th percentile to [0, 1]",
                          "inputs": "fixed and affinely pre-aligned moving on one grid"},
        "training": training,
        "validation": {"pairs": "real OASIS <-> MNE sample subject, both directions (never trained on)"
                       if config.run.validation == "real-brains" else config.run.validation, **validation},
        "engine_version": __version__,
    }


def export_trained_model(network: torch.nn.Module, config: TrainingConfig, output: Path, steps: int, wall_s: float,
                         history: list, hardware: str) -> Path:
    """Write ``output/model.safetensors`` and ``output/model.json``; returns the weights path."""
    previous = None
    if config.run.init_model:
        card = read_model_card(config.run.init_model)
        previous = {"model": config.run.init_model, "training": (card or {}).get("training")}
    card = model_card(config, network, steps, wall_s, history, hardware, previous)
    return write_model(network.state_dict(), card, output / "model.safetensors")


def write_model(state: dict[str, torch.Tensor], card: dict, path: Path) -> Path:
    """safetensors weights + ``.json`` card beside them, each written atomically."""
    try:
        from ..models import save_model  # the engine's model store (issue 8), when merged
    except ImportError:
        save_model = None
    if save_model is not None:
        try:
            return Path(save_model(state, card, path))
        except TypeError:
            pass
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(partial))
    os.replace(partial, path)
    card_path = path.with_suffix(".json")
    partial = card_path.with_name(card_path.name + ".partial")
    partial.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(partial, card_path)
    return path


def resolve_model_path(name_or_path: str) -> Path:
    """A ``.safetensors`` path from a path or a shipped model's name."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if path.exists():
        return path
    shipped = Path(__file__).resolve().parents[1] / "models" / "shipped" / f"{name_or_path}.safetensors"
    if shipped.exists():
        return shipped
    raise InputError(f"model {name_or_path!r} not found: give a .safetensors file or a shipped model name (dinoreg methods)")


def read_model_card(name_or_path: str) -> dict | None:
    path = resolve_model_path(name_or_path).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None


def read_model_weights(name_or_path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = resolve_model_path(name_or_path)
    try:
        return load_file(str(path))
    except Exception as error:
        raise InputError(f"model weights {path} could not be read ({error}): the file is corrupted, download or train it again") from None

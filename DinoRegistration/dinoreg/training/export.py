"""The trained network as an engine model (``models.save_model``): ``OUTPUT/model.safetensors`` + ``model.json``.

The card says what the network expects (spacing, array orientation, intensity normalisation: the
same rules the training data followed) and how it was trained (data, resolution, steps, hardware,
wall time) and scored (validation Dice). ``dinoreg register --method OUTPUT/model.json`` (a local
model) or copying both files into ``models/shipped/`` makes it a registration method.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch

from dinoreg.errors import InputError
from dinoreg.store import locate_model, read_card, save_model
from dinoreg.training.checkpoint import load_checkpoint
from dinoreg.training.config import TrainingConfig, parse_config
from dinoreg.training.distributed import hardware_description
from dinoreg.training.networks import build_training_network

#: synthesised brains and the real validation pair are LIA-indexed arrays (axis 0 L, 1 I, 2 A); the
#: engine's tensors are [k, j, i], so the model grid's (i, j, k) axes must point A, I, L
LIA_ARRAY_ORIENTATION = "AIL"
#: the training images' intensity rule (``data.brain_pairs.normalise_foreground``)
NORMALISATION = {"kind": "percentile", "low": 1.0, "high": 99.0}


def data_description(config: TrainingConfig) -> str:
    data = config.data
    if data.source == "synthseg":
        return (f"T1-like brains synthesised on the fly from {len(data.subjects)} SynthSeg label map(s) "
                f"(random contrast p={data.random_contrast}, random affine + diffeomorphic deformations)")
    if data.source == "random-shapes":
        return f"random-shape pairs generated on the fly ({'x'.join(str(s) for s in data.shape)} voxels)"
    return f"{data.source} {data.path}"


def orientation_of(config: TrainingConfig) -> str:
    """The array orientation the training data had (the card's ``preprocessing.orientation``)."""
    if config.data.source == "synthseg" or config.run.validation == "real-brains":
        return LIA_ARRAY_ORIENTATION
    if config.run.init_model:
        card = read_model_card(config.run.init_model)
        return str(card.get("preprocessing", {}).get("orientation", "any"))
    return "any"


def model_card(config: TrainingConfig, steps: int, wall_s: float, history: list, hardware: str,
               previous: dict | None = None) -> dict[str, Any]:
    """What the trainer knows for the card (``save_model`` adds architecture, config, hashes)."""
    last = history[-1] if history else {}
    training: dict[str, Any] = {
        "data": data_description(config), "resolution_mm": config.data.spacing_mm, "steps": steps,
        "hardware": hardware, "wall_time_s": round(wall_s, 1),
        "losses": {k: v for k, v in vars(config.loss).items() if v}, "optimiser": dict(vars(config.optimiser)),
        "seed": config.seed, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "validation_history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                if k in ("step", "wall_s", "dice")} for row in history],
    }
    if previous:
        training["initialised_from"] = previous
    validation: dict[str, Any] = {k: round(v, 4) for k, v in last.items() if k.startswith("dice")}
    if config.run.validation == "real-brains":
        validation["pairs"] = "real OASIS <-> MNE sample subject, both directions, after the affine stage (never trained on)"
    return {"preprocessing": {"spacing_mm": float(config.data.spacing_mm), "orientation": orientation_of(config),
                              "normalisation": dict(NORMALISATION)},
            "training": training, "validation": validation}


def export_trained_model(network: torch.nn.Module, config: TrainingConfig, output: Path, steps: int, wall_s: float,
                         history: list, hardware: str) -> Path:
    """Write ``output/model.safetensors`` + ``output/model.json``; returns the weights path."""
    previous = None
    if config.run.init_model:
        card = read_model_card(config.run.init_model)
        previous = {"model": config.run.init_model, "training": card.get("training")}
    card = model_card(config, steps, wall_s, history, hardware, previous)
    card["name"] = "model"
    card_path = save_model(output / "model", network, card)
    return Path(card_path).with_suffix(".safetensors")


def read_model_card(name_or_path: str) -> dict:
    """The card of a stored model (a name from 'dinoreg models list', or a .json/.safetensors path)."""
    return read_card(locate_model(name_or_path)[1])


def export_checkpoint(run_folder: Path, destination: Path) -> Path:
    """The model of a run's latest ``checkpoint.pt`` (e.g. of a run still going) saved as
    ``destination/model.safetensors`` + ``model.json``; the card says which step it is."""
    state = load_checkpoint(Path(run_folder))
    if state is None:
        raise InputError(f"no checkpoint.pt in {run_folder}: nothing to export")
    raw = dict(state["config"])
    config = parse_config(raw, f"{run_folder}/checkpoint.pt")
    network = build_training_network(config.network.name, config.network.config)
    network.load_state_dict(state["network"])
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    return export_trained_model(network, config, destination, state["step"], state["wall_s"], state["history"],
                                hardware_description(torch.device("cpu"), 1))

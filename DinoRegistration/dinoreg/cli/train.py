"""``dinoreg train`` and ``dinoreg finetune``: the command-line side of ``training/``.

    dinoreg train --config configs/unet-synthseg.toml --output runs/brain [--steps N] [--resume]
    dinoreg finetune --model runs/brain/model.safetensors --data my_scans/ --output runs/mine [--labels my_labels/]

Both write ``OUTPUT/checkpoint.pt`` every few minutes and on Ctrl-C (resume with ``--resume``),
``OUTPUT/log.csv`` and, at the end, ``OUTPUT/model.safetensors`` + ``OUTPUT/model.json``; with
``--name NAME`` the model is also installed in the models folder, so ``dinoreg register --method
NAME`` uses it. Run them under
``torchrun --nproc_per_node N -m dinoreg.cli.main train ...`` to train on N processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from dinoreg.errors import InputError

TRAIN_EPILOG = """examples:
  dinoreg train --config configs/unet-synthseg.toml --output runs/brain
  dinoreg train --config configs/unet-synthseg.toml --output runs/brain --resume   (continue after a stop)
  torchrun --nproc_per_node 4 -m dinoreg.cli.main train --config FILE --output DIR   (DDP)
The config is TOML with the sections [network] [data] [loss] [optimiser] [run] (see configs/).
"""

FINETUNE_EPILOG = """examples:
  dinoreg finetune --model my-brain --data scans/ --output runs/mine --name my-tuned   (an installed model)
  dinoreg finetune --model runs/brain/model.safetensors --data list.csv --output runs/mine --steps 1000
--data is a folder of images (NIfTI/NRRD/MHA/MGZ; affinely pre-aligned) or a CSV with columns image[,labels].
"""


def add_training_commands(sub: Any) -> None:
    """Register ``train`` and ``finetune`` on the ``dinoreg`` sub-command parser."""
    train = sub.add_parser("train", help="train a registration network from a TOML config",
                           description="Train a registration network; writes checkpoint.pt, log.csv and "
                           "model.safetensors + model.json (the model card) into OUTPUT.",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", required=True, help="TOML training config (examples in configs/)")
    train.add_argument("--output", required=True, help="run folder: checkpoint, log and final model")
    train.add_argument("--steps", type=int, help="total training steps (overrides run.steps)")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    train.add_argument("--device", help="auto, cpu or cuda (overrides run.device)")
    train.add_argument("--name", help="also install the final model as NAME in the models folder, so that "
                       "'dinoreg register --method NAME' uses it")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=command_train)

    finetune = sub.add_parser("finetune", help="fine-tune a trained model on your own volumes",
                              description="Fine-tune a trained model (shipped name or .safetensors path) on a "
                              "folder or CSV list of volumes with the same network and preprocessing.",
                              epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_argument("--model", required=True, help="model to start from: shipped name or .safetensors path")
    finetune.add_argument("--data", required=True, help="folder of images, or CSV with columns image[,labels]")
    finetune.add_argument("--output", required=True, help="run folder: checkpoint, log and final model")
    finetune.add_argument("--labels", default="", help="folder of label maps named like the images (Dice loss and validation)")
    finetune.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    finetune.add_argument("--learning-rate", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    finetune.add_argument("--config", help="TOML config whose [loss] [optimiser] [run] settings are used")
    finetune.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    finetune.add_argument("--device", help="auto, cpu or cuda")
    finetune.add_argument("--name", help="also install the final model as NAME in the models folder (--method NAME)")
    finetune.add_argument("--quiet", action="store_true", help="no progress bar")
    finetune.set_defaults(func=command_finetune)


def command_train(args: argparse.Namespace) -> int:
    from dinoreg.training.config import load_config  # lazy: not needed to start dinoreg

    config = load_config(args.config)
    return run(config, args)


def command_finetune(args: argparse.Namespace) -> int:
    from dinoreg.store import locate_model, read_card  # lazy: not needed to start dinoreg
    from dinoreg.training.config import TrainingConfig, load_config  # lazy: not needed to start dinoreg


    weights, card_path, _, _ = locate_model(args.model)
    card = read_card(card_path) if card_path.is_file() else None
    if not card or "architecture" not in card:
        raise InputError(f"{weights} has no model card ({weights.with_suffix('.json').name}) naming its architecture: "
                         "fine-tune a model written by dinoreg train")
    config = load_config(args.config) if args.config else TrainingConfig()
    config.network.name = str(card["architecture"])
    config.network.config = dict(card.get("config", {}))
    config.data.source = "csv" if str(args.data).lower().endswith(".csv") else "folder"
    config.data.path = str(args.data)
    config.data.labels_path = args.labels
    config.data.spacing_mm = float(card.get("preprocessing", {}).get("spacing_mm", config.data.spacing_mm))
    config.data.max_velocity_mm = 0.0
    config.run.init_model = str(weights)
    config.run.steps = args.steps
    config.optimiser.learning_rate = args.learning_rate
    if not args.config:
        config.loss.lncc, config.loss.dice = 1.0, (1.0 if args.labels else 0.0)
        config.run.validation = "data" if args.labels else "none"
    return run(config, args)


def install_model(weights: Path, name: str) -> Path:
    """Copy a trained model into the models folder as ``name`` (card's name updated; hash unchanged)."""
    from dinoreg.store import models_dir  # lazy: not needed to start dinoreg



    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise InputError(f"--name {name!r} must be a plain model name such as 'my-brain-model'")
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    card = json.loads(weights.with_suffix(".json").read_text())
    card["name"] = name
    partial = folder / f".{name}.safetensors.partial"
    shutil.copyfile(weights, partial)
    os.replace(partial, folder / f"{name}.safetensors")
    partial = folder / f".{name}.json.partial"
    partial.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(partial, folder / f"{name}.json")
    return folder / f"{name}.safetensors"


def run(config: Any, args: argparse.Namespace) -> int:
    from dinoreg.training.trainer import train  # lazy: imports numpy, torch

    if getattr(args, "steps", None):
        config.run.steps = int(args.steps)
    if getattr(args, "device", None):
        config.run.device = args.device
    path = train(config, Path(args.output), resume=args.resume, progress_bar=not args.quiet)
    if path is not None:
        print(f"model written: {path} (+ {path.with_suffix('.json').name})", file=sys.stderr)
        if getattr(args, "name", None):
            installed = install_model(path, args.name)
            print(f"installed as {installed}; register with: dinoreg register FIXED MOVING -o OUT --method {args.name}",
                  file=sys.stderr)
        else:
            print("to use it: rerun with --name NAME, or copy both files as NAME.safetensors/NAME.json into "
                  "the models folder ('dinoreg models list' shows it)", file=sys.stderr)
        return 0
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 writes the model
    return 130  # stopped early: the checkpoint is saved, --resume continues

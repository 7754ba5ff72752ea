"""Does random-shape pretraining help? Validation Dice on the real brain pair vs training steps.

The pretraining source claims that registering random-shape images first improves accuracy, needs
~10x less domain data and converges faster. Three arms at equal total compute (steps):

- (a) ``scratch``: synthesised brains (20 SynthSeg label maps) for all ``--steps``;
- (b) ``pretrained``: ``--pretrain-steps`` on random shapes, then synthesised brains;
- (c) ``pretrained-2maps``: the same pretraining, then brains synthesised from only 2 label maps
  (10 % of the domain data).

Validation: mean Dice (31 structures) on the real OASIS <-> MNE pair in both directions, after the
engine's affine stage (``data/real_pairs.py``); never trained on. Runs at ``--spacing`` mm (4 mm by
default: the CPU budget of this study) with a small VoxelMorph-style ``unet``. Every run is resumable; the
script skips finished runs, then writes ``pretraining_study.png`` and prints a Markdown table.

Usage::

    python benchmarks/pretraining_study.py --output runs/study [--steps 600 --pretrain-steps 200]
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "DinoRegistration"))

from dinoreg.training.config import TrainingConfig, parse_config  # noqa: E402
from dinoreg.training.trainer import train  # noqa: E402

ARMS = ("scratch", "pretrained", "pretrained-2maps")


def base_config(args: argparse.Namespace) -> TrainingConfig:
    spacing = args.spacing
    shape = [int(round(s / spacing / 8) * 8) for s in (160, 192, 224)]
    return parse_config({
        "seed": args.seed,
        "network": {"name": "unet", "config": {"encoder": [16, 32, 32], "decoder": [32, 16], "output_level": 1, "integrate_steps": 7}},
        "data": {"source": "synthseg", "spacing_mm": float(spacing), "shape": shape, "cache": str(args.cache),
                 "max_velocity_mm": 6.0},
        "loss": {"dice": 1.0, "lncc": 0.3, "diffusion": 0.3, "lncc_window": 3, "dice_downsample": 1},
        "optimiser": {"name": "adam", "learning_rate": 5e-4},
        "run": {"steps": args.steps, "threads": args.threads, "validate_every": args.validate_every,
                "validation": "real-brains", "checkpoint_minutes": 3.0},
    }, "study")


def arm_configs(args: argparse.Namespace) -> dict[str, TrainingConfig]:
    base = base_config(args)
    pretrain = copy.deepcopy(base)
    pretrain.data.source = "random-shapes"
    pretrain.loss.lncc, pretrain.loss.dice = 1.0, 0.5
    pretrain.run.steps = args.pretrain_steps
    pretrained_model = str(args.output / "pretrain" / "model.safetensors")
    finetune = copy.deepcopy(base)
    finetune.run.steps = args.steps - args.pretrain_steps
    finetune.run.init_model = pretrained_model
    two_maps = copy.deepcopy(finetune)
    two_maps.data.subjects = [1, 2]
    return {"scratch": base, "pretrain": pretrain, "pretrained": finetune, "pretrained-2maps": two_maps}


def validation_curve(folder: Path, offset: int = 0) -> list[tuple[int, float]]:
    """(step, mean real-pair Dice) rows of a run's log.csv, steps shifted by ``offset``."""
    rows: list[tuple[int, float]] = []
    if not (folder / "log.csv").exists():
        return rows
    with open(folder / "log.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["key"] == "val/dice":
                rows.append((int(row["step"]) + offset, float(row["value"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dinoreg" / "training")
    parser.add_argument("--steps", type=int, default=600, help="total steps of every arm")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--spacing", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=BENCH_DIR / "pretraining_study.png")
    parser.add_argument("--report-only", action="store_true", help="plot and tabulate the runs as they are now")
    args = parser.parse_args()
    if args.report_only:
        report(args)
        return
    configs = arm_configs(args)
    for name in ("pretrain", "pretrained", "pretrained-2maps", "scratch"):
        folder = args.output / name
        if (folder / "model.safetensors").exists():
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        train(configs[name], folder, resume=True, progress_bar=False)
    report(args)


def report(args: argparse.Namespace) -> None:
    pre = [(s, d) for s, d in validation_curve(args.output / "pretrain") if s <= args.pretrain_steps]
    curves = {"scratch": validation_curve(args.output / "scratch"),
              "pretrained": pre + validation_curve(args.output / "pretrained", args.pretrain_steps)[1:],
              "pretrained-2maps": pre + validation_curve(args.output / "pretrained-2maps", args.pretrain_steps)[1:]}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    labels = {"scratch": "(a) scratch, 20 label maps", "pretrained": "(b) random shapes, then 20 maps",
              "pretrained-2maps": "(c) random shapes, then 2 maps"}
    for name, curve in curves.items():
        axis.plot([s for s, _ in curve], [d for _, d in curve], marker="o", markersize=3, label=labels[name])
    axis.axvline(args.pretrain_steps, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("training steps (pretraining included)")
    axis.set_ylabel("Dice, real OASIS<->MNE pair (mean of 2)")
    axis.set_title(f"Pretraining study, unet at {args.spacing} mm, CPU")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=100)
    steps = sorted({s for curve in curves.values() for s, _ in curve})
    print("| steps | " + " | ".join(labels[n] for n in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for step in steps:
        cells = [next((f"{d:.4f}" for s, d in curves[n] if s == step), "") for n in curves]
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

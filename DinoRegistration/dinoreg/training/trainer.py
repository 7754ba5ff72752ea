"""The training loop behind ``dinoreg train`` / ``dinoreg finetune``.

One process or many (torchrun): pairs drawn on the fly (per-rank generators re-seeded from
(seed, rank, step)), a weighted loss (``losses.RegistrationLoss``), Adam/AdamW with polynomial decay,
autocast (bfloat16) on CUDA, optional gradient checkpointing, a checkpoint every
``run.checkpoint_minutes`` and on exit (Ctrl-C, SIGTERM, errors), ``--resume`` from it, a progress bar,
a CSV log (``log.csv``) and TensorBoard events when ``tensorboard`` is installed, periodic validation
Dice, and at the end the model in the engine's format (``model.safetensors`` + ``model.json``).
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dinoreg.core.geometry import warp
from dinoreg.data.pairs import stack_pairs
from dinoreg.data.sources import default_cache, make_source
from dinoreg.errors import InputError
from dinoreg.losses import RegistrationLoss, dice_loss, one_hot
from dinoreg.store import read_model_files
from dinoreg.training.checkpoint import load_checkpoint, save_checkpoint
from dinoreg.training.config import TrainingConfig
from dinoreg.training.distributed import (DistributedContext, hardware_description, setup_distributed,
                                          teardown_distributed)
from dinoreg.training.export import export_trained_model
from dinoreg.training.networks import build_training_network, shape_multiple


class StopTraining(Exception):
    """Raised by the signal handler: save a checkpoint and leave."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the data generator of one rank at one step (resume draws the same pairs)."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2 ** 63 - 1)


def poly_factor(step: int, total: int, power: float) -> float:
    """Polynomial learning-rate decay factor (1 at step 0, 0 at ``total``)."""
    return max(0.0, 1.0 - step / max(1, total)) ** power


class CsvLog:
    """Append-only CSV of training metrics (+ TensorBoard scalars when available); rank 0 only."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.path = folder / "log.csv"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: TensorBoard logging when installed

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except Exception:  # tensorboard not installed: the CSV is enough
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "key", "value", "wall_s"])
            for key, value in row.items():
                if key not in ("step", "wall_s"):
                    writer.writerow([row["step"], key, f"{value:.6g}" if isinstance(value, float) else value, f"{row['wall_s']:.1f}"])
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "wall_s") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def validation_pairs(config: TrainingConfig, source: Any, cache: Path) -> list:
    """The labelled pairs of ``run.validation`` (empty for ``none``)."""
    from dinoreg.training.validation import LabelledPair  # lazy: imports SimpleITK, scipy

    if config.run.validation == "real-brains":
        from dinoreg.data.real_pairs import real_pairs  # lazy: imports SimpleITK, scipy

        return [LabelledPair(p.name, p.fixed, p.moving, p.fixed_labels, p.moving_labels) for p in real_pairs(cache)]
    if config.run.validation == "data":
        if config.run.validation_path:
            from dinoreg.data.volumes import (VolumePairSampler, csv_entries,  # lazy: imports SimpleITK, scipy
                                              folder_entries)  # lazy: imports SimpleITK, scipy

            path = Path(config.run.validation_path)
            entries = csv_entries(path) if path.suffix.lower() == ".csv" else folder_entries(path, config.data.labels_path)
            return VolumePairSampler(entries, config.data.spacing_mm).labelled_pairs()
        if hasattr(source, "labelled_pairs"):
            return source.labelled_pairs()
        raise InputError("run.validation = 'data' needs run.validation_path or a folder/csv data source with label maps")
    return []


class TrainingLoss:
    """``losses.RegistrationLoss`` for the image and smoothness terms, plus Dice on subsampled labels.

    Dice is computed on the label maps and the field taken at every ``dice_downsample``-th voxel
    (the field divided by the factor, so it is exact on that sub-grid): one-hot maps of ~30 labels
    are the costliest part of a step at full resolution.
    """

    def __init__(self, loss_config, label_ids: list, registration_loss_class) -> None:
        weights = {k: v for k, v in vars(loss_config).items() if k not in ("lncc_window", "dice_downsample", "dice", "supervised")}
        self.supervised_weight = loss_config.supervised
        self.image_terms = registration_loss_class(weights, lncc_window=loss_config.lncc_window)
        self.dice_weight = loss_config.dice if label_ids else 0.0
        self.label_ids = label_ids
        self.factor = max(1, int(loss_config.dice_downsample))
        self.parts: dict[str, float] = {}

    def __call__(self, fixed, moving, field, fixed_labels=None, moving_labels=None, truth=None) -> torch.Tensor:
        total = self.image_terms(fixed, moving, field)
        self.parts = dict(self.image_terms.parts)
        if self.dice_weight and fixed_labels is not None and moving_labels is not None:
            f = self.factor
            sub = (slice(None), slice(None), slice(None, None, f), slice(None, None, f), slice(None, None, f))
            warped = warp(one_hot(moving_labels[sub], self.label_ids), field[sub] / f)
            dice = dice_loss(one_hot(fixed_labels[sub], self.label_ids), warped)
            total = total + self.dice_weight * dice
            self.parts["dice"] = float(self.dice_weight * dice.detach())
        if self.supervised_weight and truth is not None:
            error = ((field - truth) ** 2).sum(dim=1).mean()
            total = total + self.supervised_weight * error
            self.parts["supervised"] = float(self.supervised_weight * error.detach())
        return total


def train(config: TrainingConfig, output: Path, resume: bool = False, progress_bar: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> Path | None:
    """Run (or resume) a training; returns the saved model's ``.safetensors`` path (rank 0), else None."""
    from dinoreg.core.spatial import resolve_device  # lazy: imports SimpleITK

    output = Path(output)
    device = resolve_device(config.run.device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    context = setup_distributed(device)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    try:
        model_path = run_training(config, output, resume, progress_bar, on_step, device, context,
                                  make_source, RegistrationLoss, default_cache)
        # every rank waits for rank 0's export before leaving the group: a rank destroying the group
        # while another still uses it made gloo abort (SIGABRT, seen once in CI under load)
        context.barrier()
        return model_path
    finally:
        teardown_distributed(context)


def run_training(config, output, resume, progress_bar, on_step, device, context: DistributedContext,
                 make_source, RegistrationLoss, default_cache) -> Path | None:
    if context.is_main:
        output.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(output) if resume else None
    if resume and state is None and context.is_main:
        print(f"no checkpoint in {output}: starting from step 0", file=sys.stderr)
    if not resume and (output / "checkpoint.pt").exists():
        raise InputError(f"{output} already holds a training checkpoint: add --resume to continue it, or choose a new --output")

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    network = build_training_network(config.network.name, config.network.config).to(device)
    if config.run.init_model:
        load_initial_weights(network, config.run.init_model)
    if config.run.gradient_checkpointing and hasattr(network, "gradient_checkpointing"):
        network.gradient_checkpointing = True
    multiple = shape_multiple(network)
    source = make_source(config.data, device, multiple)
    label_ids = list(getattr(source, "label_ids", []))
    loss_function = TrainingLoss(config.loss, label_ids, RegistrationLoss)
    optimiser_class = torch.optim.AdamW if config.optimiser.name == "adamw" else torch.optim.Adam
    optimiser = optimiser_class(network.parameters(), lr=config.optimiser.learning_rate,
                                weight_decay=config.optimiser.weight_decay)
    total_steps = config.run.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: poly_factor(s, total_steps, config.optimiser.poly_power))
    step, wall_before, history = 0, 0.0, []
    if state is not None:
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        step, wall_before, history = state["step"], state["wall_s"], state["history"]
    model = network
    if context.enabled:
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    cache = Path(config.data.cache).expanduser() if config.data.cache else default_cache()
    val_pairs = validation_pairs(config, source, cache) if context.is_main else []
    log = CsvLog(output, context.is_main)
    amp = config.run.amp and device.type == "cuda"
    generator = torch.Generator(device=device)
    started = time.time()
    last_checkpoint = started
    stop = {"flag": False}
    first_loss = None

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stop["flag"] = True

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def wall() -> float:
        return wall_before + time.time() - started

    def checkpoint() -> None:
        if context.is_main:
            save_checkpoint(output, {"network": network.state_dict(), "optimiser": optimiser.state_dict(),
                                     "scheduler": scheduler.state_dict(), "step": step, "wall_s": wall(),
                                     "history": history, "config": config.to_dict()})

    def run_validation() -> None:
        if context.is_main and val_pairs:
            from dinoreg.training.validation import validate  # lazy: imports SimpleITK, scipy

            ids = label_ids if config.data.source != "random-shapes" else sorted({int(v) for p in val_pairs for v in np.unique(p.fixed_labels)} - {0})
            if config.run.validation == "real-brains":
                from dinoreg.data.synthesis import EVAL_LABELS  # lazy: imports SimpleITK, scipy

                ids = EVAL_LABELS
            scores = validate(network, val_pairs, config.data.spacing_mm, ids, device)
            history.append({"step": step, "wall_s": wall(), **scores})
            log.write({"step": step, "wall_s": wall(), **{f"val/{k}": v for k, v in scores.items()}})

    bar = None
    if context.is_main and progress_bar:
        from tqdm import tqdm  # lazy: only when a terminal bar is shown

        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    network.train()
    try:
        if step == 0 and not history:
            run_validation()
        while step < total_steps:
            if context.broadcast_flag(stop["flag"]):
                raise StopTraining()
            generator.manual_seed(step_seed(config.seed, context.rank, step))
            pairs = [source.sample(generator) for _ in range(config.run.batch_size)]
            batch = stack_pairs(pairs)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                field = model(batch.fixed, batch.moving)
            loss = loss_function(batch.fixed, batch.moving, field.float(), batch.fixed_labels, batch.moving_labels,
                                 batch.displacement)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.optimiser.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(network.parameters(), config.optimiser.grad_clip)
            optimiser.step()
            scheduler.step()
            step += 1
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"the loss became {float(loss.detach())} at step {step}: lower optimiser.learning_rate")
            metrics = {"loss": float(loss.detach()), **{f"loss/{k}": v for k, v in loss_function.parts.items()},
                       "lr": scheduler.get_last_lr()[0]}
            if first_loss is None:
                first_loss = metrics["loss"]
            if on_step is not None:
                on_step(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if context.is_main and (step % config.run.log_every == 0 or step == total_steps):
                log.write({"step": step, "wall_s": wall(), **metrics, "steps_per_s": step / max(wall(), 1e-9)})
            if config.run.validate_every and step % config.run.validate_every == 0 and step < total_steps:
                run_validation()
            if context.broadcast_flag(time.time() - last_checkpoint >= 60 * config.run.checkpoint_minutes):
                checkpoint()
                last_checkpoint = time.time()
        run_validation()
    except (StopTraining, KeyboardInterrupt):
        checkpoint()
        if context.is_main:
            print(f"\nstopped at step {step}: checkpoint saved in {output}; continue with --resume", file=sys.stderr)
        return None
    except BaseException:
        checkpoint()
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    fit_feature_basis(network, source, config.seed)
    checkpoint()
    record_rank_agreement(network, context, output, first_loss)
    if not context.is_main:
        return None

    return export_trained_model(network, config, output, step, wall(), history, hardware_description(device, context.world_size))


@torch.no_grad()
def fit_feature_basis(network: torch.nn.Module, source: Any, seed: int, pairs: int = 8, voxels: int = 20_000) -> None:
    """Networks that reduce frozen features to fewer channels at inference (FMIR: a PCA basis) fit
    that basis here, on TRAINING pairs (never on the pairs being registered), and store it in the
    weights. Identical on every rank (same seed, same pairs)."""
    if not hasattr(network, "fit_channel_basis") or getattr(network, "channels", 0) >= getattr(network, "raw_channels", 0):
        return
    generator = torch.Generator(device=next(network.parameters()).device).manual_seed(seed + 99_991)
    samples = []
    for _ in range(pairs):
        pair = source.sample(generator)
        for image in (pair.fixed, pair.moving):
            features = network.raw_features(image).flatten(2)[0].T  # (voxels, raw_channels)
            index = torch.randint(features.shape[0], (min(voxels, features.shape[0]),), generator=generator,
                                  device=generator.device)
            samples.append(features[index.to(features.device)])
    network.fit_channel_basis(torch.cat(samples))


def parameter_checksum(network: torch.nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank when DDP kept them in step."""
    return float(sum(p.detach().double().sum() for p in network.parameters()))


def record_rank_agreement(network: torch.nn.Module, context: DistributedContext, output: Path, first_loss: float | None) -> None:
    """Under DDP: gather every rank's parameter checksum and first loss; rank 0 writes ``ranks.json``.

    Raises when the ranks' weights differ (a broken gradient synchronisation must not go unnoticed).
    """
    if not context.enabled:
        return
    mine = {"rank": context.rank, "checksum": parameter_checksum(network), "first_loss": first_loss}
    everyone: list = [None] * context.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if context.is_main:
        (output / "ranks.json").write_text(json.dumps(everyone, indent=1) + "\n")
    checksums = [entry["checksum"] for entry in everyone]
    if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
        raise RuntimeError(f"DDP ranks ended with different weights (checksums {checksums}): gradient synchronisation failed")


def load_initial_weights(network: torch.nn.Module, name_or_path: str) -> None:
    """Start from a saved model's weights (fine-tuning): a shipped model name or a .safetensors path."""
    state, _, _ = read_model_files(name_or_path)  # SHA-256 checked like every other reader
    missing, unexpected = network.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(list(network.state_dict())):
        raise InputError(f"weights of {name_or_path} do not fit network.name's architecture: fine-tune with the same network and config")

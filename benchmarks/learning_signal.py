"""Does a registration network learn at all? Loss, predicted displacement and held-out Dice per step.

Not a test: a diagnostic written for issue 9 (validation Dice of the trained ``unet`` constant to four
decimals over 1500 steps). It trains the engine's network on random-shape pairs (a new pair every step,
as the trainer does, or one pair again and again with ``--one-pair``) with the engine's losses, and
prints every ``--every`` steps: the mean training loss, the mean predicted displacement |u| (voxels) and
the Dice gain over no registration on 4 held-out pairs. A wiring fault (detached graph, ignored field)
keeps |u| at ~1e-4 even with ``--one-pair``; a network that fits one pair but keeps |u| ~0 on new pairs
has not yet learnt a pair-dependent registration (an optimisation plateau, not a wiring fault).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/learning_signal.py --steps 300 --lr 1e-3
    OMP_NUM_THREADS=1 python benchmarks/learning_signal.py --steps 60 --lr 2e-3 --one-pair
    python benchmarks/learning_signal.py --device cuda --size 64 --steps 20000 --every 1000   # a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=32, help="cube side in voxels (multiple of 8)")
    parser.add_argument("--max-velocity", type=float, default=6.0, help="voxels")
    parser.add_argument("--dice", type=float, default=1.0)
    parser.add_argument("--lncc", type=float, default=0.3)
    parser.add_argument("--one-pair", action="store_true", help="train on one pair only (checks the wiring)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dinoreg.data.random_shapes import RandomShapeSettings, random_shape_pair
    from dinoreg.core.geometry import warp
    from dinoreg.losses import dice_loss, one_hot
    from dinoreg.losses.similarity import local_ncc_loss
    from dinoreg.networks import build_network
    from dinoreg.training.validation import mean_dice

    device = torch.device(args.device)
    shape = (args.size,) * 3
    settings = RandomShapeSettings(max_velocity_voxels=args.max_velocity)
    labels = list(range(settings.n_shapes))
    torch.manual_seed(0)
    network = build_network("unet", {"encoder": [16, 32, 32], "decoder": [32, 16], "output_level": 1,
                                     "integrate_steps": 7}).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=args.lr)
    pair_of = (lambda seed: random_shape_pair(shape, torch.Generator(device=device).manual_seed(seed), settings, device))
    held_out = [pair_of(1) if args.one_pair else pair_of(10_000 + s) for s in range(1 if args.one_pair else 4)]

    def evaluate() -> tuple[float, float]:
        gains, sizes = [], []
        with torch.no_grad():
            for p in held_out:
                field = network(p.fixed, p.moving)
                sizes.append(float(field.norm(dim=1).mean()))
                after = mean_dice(p.fixed_labels, warp(p.moving_labels, field, mode="nearest"), labels)
                gains.append(after - mean_dice(p.fixed_labels, p.moving_labels, labels))
        return float(np.mean(gains)), float(np.mean(sizes))

    print(f"{'step':>6} {'train loss':>10} {'|u| voxels':>10} {'held-out dDice':>14} {'s':>6}")
    losses, started = [], time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            gain, size = evaluate()
            recent = np.mean(losses[-args.every:]) if losses else float("nan")
            print(f"{step:>6} {recent:>10.4f} {size:>10.4f} {gain:>+14.4f} {time.time() - started:>6.0f}", flush=True)
        if step == args.steps:
            break
        p = pair_of(1 if args.one_pair else step)
        field = network(p.fixed, p.moving)
        loss = args.dice * dice_loss(one_hot(p.fixed_labels, labels), warp(one_hot(p.moving_labels, labels), field))
        if args.lncc:
            loss = loss + args.lncc * local_ncc_loss(p.fixed, warp(p.moving, field), 3)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))


if __name__ == "__main__":
    main()

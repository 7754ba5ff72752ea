"""Validation Dice of a registration network on labelled pairs (the real OASIS/MNE pair by default).

Pairs are given at 1 mm (fixed and affinely pre-aligned moving on the fixed grid, LIA arrays); the
network runs at the training spacing (an integer number of millimetres: images are average-pooled),
its field is resized back to 1 mm and the moving labels are warped nearest-neighbour there, as the
product does with a full-resolution transform. Dice is averaged over the labels present in both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.core.geometry import warp
from dinoreg.data.brain_pairs import normalise_foreground
from dinoreg.data.pairs import LabelledPair


def mean_dice(fixed_labels: torch.Tensor, warped_labels: torch.Tensor, label_ids: Sequence[int]) -> float:
    """Mean Dice over ``label_ids`` present in both integer label maps (hand-checked in the tests)."""
    scores = []
    for label in label_ids:
        a, b = fixed_labels == label, warped_labels == label
        total = int(a.sum()) + int(b.sum())
        if a.any() and b.any():
            scores.append(2.0 * int((a & b).sum()) / total)
    return float(np.mean(scores)) if scores else float("nan")


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad ``(N, C, D, H, W)`` at the high end of each axis to a multiple of ``multiple``."""
    shape = list(image.shape[2:])
    padded = [int(np.ceil(s / multiple) * multiple) for s in shape]
    pad = []
    for s, p in reversed(list(zip(shape, padded))):
        pad += [0, p - s]
    return F.pad(image, pad), shape


@torch.no_grad()
def predict_field(network: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor, factor: int,
                  multiple: int) -> torch.Tensor:
    """Field ``(1, 3, D, H, W)`` in voxels of the fine grid, from the network run ``factor`` times coarser."""
    fine = tuple(fixed.shape[2:])
    if factor > 1:
        fixed, moving = F.avg_pool3d(fixed, factor, ceil_mode=True), F.avg_pool3d(moving, factor, ceil_mode=True)
    fixed, moving = normalise_foreground(fixed), normalise_foreground(moving)
    fixed_p, coarse = pad_to_multiple(fixed, multiple)
    moving_p, _ = pad_to_multiple(moving, multiple)
    field = network(fixed_p, moving_p)[:, :, : coarse[0], : coarse[1], : coarse[2]]
    if factor > 1:
        # coarse voxel centres sit at factor * i + (factor - 1) / 2 on the fine grid: align_corners=False
        field = F.interpolate(field * factor, size=fine, mode="trilinear", align_corners=False)
    return field


def validate(network: torch.nn.Module, pairs: Sequence[LabelledPair], spacing_mm: float, label_ids: Sequence[int],
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean Dice per pair (``dice/<name>``) and over pairs (``dice``), plus the unregistered baseline."""
    factor = max(1, int(round(spacing_mm)))
    multiple = int(getattr(network, "shape_multiple", 16))
    was_training = network.training
    network.eval()
    results: dict[str, float] = {}
    for pair in pairs:
        as_tensor = (lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device))
        field = predict_field(network, as_tensor(pair.fixed), as_tensor(pair.moving), factor, multiple)
        fixed_labels = torch.from_numpy(pair.fixed_labels.astype(np.int64))[None, None].to(device)
        moving_labels = torch.from_numpy(pair.moving_labels.astype(np.int64))[None, None].to(device)
        warped = warp(moving_labels, field, mode="nearest")
        results[f"dice/{pair.name}"] = mean_dice(fixed_labels, warped, label_ids)
        results[f"dice_before/{pair.name}"] = mean_dice(fixed_labels, moving_labels, label_ids)
    names = [p.name for p in pairs]
    results["dice"] = float(np.mean([results[f"dice/{n}"] for n in names]))
    network.train(was_training)
    return results

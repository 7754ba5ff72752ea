"""What a training step consumes: a fixed/moving image pair with optional one-hot label maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class TrainingPair:
    """Images ``(N, 1, D, H, W)`` in [0, 1] on one voxel grid; integer label maps ``(N, 1, D, H, W)`` or None."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: Optional[torch.Tensor] = None
    moving_labels: Optional[torch.Tensor] = None
    #: the true fixed -> moving voxel displacement ``(N, 3, D, H, W)`` when known (synthetic pairs of one anatomy)
    displacement: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "TrainingPair":
        move = (lambda t: None if t is None else t.to(device))
        return TrainingPair(move(self.fixed), move(self.moving), move(self.fixed_labels), move(self.moving_labels),
                            move(self.displacement))


def stack_pairs(pairs: list[TrainingPair]) -> TrainingPair:
    """Concatenate pairs along the batch axis (all must have labels or none; a true displacement is
    kept only when every pair has one)."""
    cat = (lambda items: None if any(item is None for item in items) else torch.cat(items, dim=0))
    return TrainingPair(cat([p.fixed for p in pairs]), cat([p.moving for p in pairs]),
                        cat([p.fixed_labels for p in pairs]), cat([p.moving_labels for p in pairs]),
                        cat([p.displacement for p in pairs]))


@dataclass
class LabelledPair:
    """Fixed and moving images (float arrays, [D, H, W], one grid) and their integer label maps."""

    name: str
    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray
    moving_labels: np.ndarray

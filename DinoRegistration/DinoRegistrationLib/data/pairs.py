"""What a training step consumes: a fixed/moving image pair with optional one-hot label maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TrainingPair:
    """Images ``(N, 1, D, H, W)`` in [0, 1] on one voxel grid; labels one-hot ``(N, L, D, H, W)`` or None."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: Optional[torch.Tensor] = None
    moving_labels: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "TrainingPair":
        move = (lambda t: None if t is None else t.to(device))
        return TrainingPair(move(self.fixed), move(self.moving), move(self.fixed_labels), move(self.moving_labels))


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(N, 1, D, H, W)`` integer labels 0..n_classes-1 -> float one-hot ``(N, n_classes, D, H, W)``."""
    return torch.nn.functional.one_hot(labels[:, 0].long(), n_classes).permute(0, 4, 1, 2, 3).float()


def stack_pairs(pairs: list[TrainingPair]) -> TrainingPair:
    """Concatenate pairs along the batch axis (all must have labels or none)."""
    cat = (lambda items: None if items[0] is None else torch.cat(items, dim=0))
    return TrainingPair(cat([p.fixed for p in pairs]), cat([p.moving for p in pairs]),
                        cat([p.fixed_labels for p in pairs]), cat([p.moving_labels for p in pairs]))

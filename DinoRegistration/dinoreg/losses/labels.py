"""Label-map overlap for weak supervision: one-hot encoding and soft Dice."""

from __future__ import annotations

from typing import Sequence

import torch

from dinoreg.requirements import missing_family_error


def one_hot(labels: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(N, 1, D, H, W)`` integer label map -> ``(N, L, D, H, W)`` float one-hot of ``label_ids``
    (in that order; voxels with other labels are 0 in every channel)."""
    ids = torch.as_tensor(list(label_ids), device=labels.device).view(1, -1, 1, 1, 1)
    return (labels.long() == ids).float()


def dice_loss(fixed_one_hot: torch.Tensor, warped_one_hot: torch.Tensor) -> torch.Tensor:
    """``1 - mean soft Dice`` over batch and label channels (MONAI's ``DiceLoss``; 0 = perfect overlap).

    Both are ``(N, L, D, H, W)`` in [0, 1]: the fixed one-hot map and the moving one-hot map warped
    with ``mode="bilinear"`` (soft, differentiable). Put only foreground labels in the channels.
    """
    try:
        from monai.losses import DiceLoss
    except ImportError as error:
        raise missing_family_error("losses", "MONAI's losses") from error

    return DiceLoss(include_background=True, reduction="mean")(warped_one_hot, fixed_one_hot)

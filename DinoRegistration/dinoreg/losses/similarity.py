"""Image similarity losses: local NCC, MSE and MIND-SSC (0 for identical images)."""

from __future__ import annotations

from typing import Sequence

import torch

from dinoreg.requirements import missing_family_error
from dinoreg.core.geometry import warp


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9) -> torch.Tensor:
    """``1 - mean local normalised cross-correlation`` over ``window``^3 boxes (0 = perfect match).

    MONAI's ``LocalNormalizedCrossCorrelationLoss`` (rectangular kernel; it returns -LNCC).
    ``fixed`` and ``warped`` are ``(N, C, D, H, W)`` on one grid; ``window`` is odd, in voxels.
    """
    if window % 2 == 0 or window < 1:
        raise ValueError(f"the local NCC window must be an odd number of voxels, got {window}")
    try:
        from monai.losses import LocalNormalizedCrossCorrelationLoss
    except ImportError as error:
        raise missing_family_error("losses", "MONAI's losses") from error

    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=int(window), kernel_type="rectangular")
    return 1.0 + loss(warped, fixed)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference (intensities as given, e.g. normalised to [0, 1])."""
    return (fixed - warped).square().mean()


def mind_features(images: torch.Tensor, radius: int = 1, dilation: int = 2,
                  spacing: Sequence[float] | None = None) -> torch.Tensor:
    """MIND-SSC ``(N, 12, D, H, W)`` of each image of ``images (N, 1, D, H, W)`` (no gradient: the
    descriptors are computed once per image; ``spacing`` (sD, sH, sW) mm for anisotropic grids)."""
    from dinoreg.features.mind import mind_ssc  # lazy: imports SimpleITK, numpy

    spacing_ijk = None if spacing is None else tuple(float(s) for s in reversed(list(spacing)))
    with torch.no_grad():
        return torch.cat([mind_ssc(image[None], None, radius, dilation, spacing_ijk) for image in images.float()])


def mind_loss(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor, radius: int = 1, dilation: int = 2,
              spacing: Sequence[float] | None = None, fixed_features: torch.Tensor | None = None,
              moving_features: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors after warping the moving descriptors by ``displacement``.

    As in ConvexAdam, descriptors are computed on the unwarped images and the moving ones are warped
    (so the loss is differentiable in the field without differentiating MIND). Pass precomputed
    ``fixed_features`` / ``moving_features`` (from :func:`mind_features`) to save time in a loop.
    Images ``(N, 1, D, H, W)``, field ``(N, 3, D, H, W)`` voxels.
    """
    if fixed_features is None:
        fixed_features = mind_features(fixed, radius, dilation, spacing)
    if moving_features is None:
        moving_features = mind_features(moving, radius, dilation, spacing)
    return (fixed_features - warp(moving_features, displacement)).square().mean()

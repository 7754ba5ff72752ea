"""Regularisers beyond the smoothness penalties of the geometry core."""

from __future__ import annotations

import torch

from dinoreg.core.geometry import compose


def inverse_consistency_loss(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Mean squared residual of both compositions, in voxels^2 (0 when ``backward`` inverts ``forward``).

    ``forward`` maps fixed to moving voxels, ``backward`` moving to fixed (e.g. the network run on the
    swapped pair); both ``(N, 3, D, H, W)`` on one grid.
    """
    return 0.5 * (compose(forward, backward).square().sum(1).mean() + compose(backward, forward).square().sum(1).mean())

"""Jacobian determinant of ``x + u(x)`` for batched displacement fields."""

from __future__ import annotations

from typing import Sequence

import torch


def determinant_3x3(m: torch.Tensor) -> torch.Tensor:
    """Determinants of 3x3 matrices ``(..., 3, 3)`` by the rule of Sarrus (much faster than an LU
    for millions of tiny matrices)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def jacobian_determinant(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """``det(d(x + u)/dx)`` at every voxel: ``(N, 1, D, H, W)``; 1 keeps volume, <= 0 is folding.

    ``displacement`` ``(N, 3, D, H, W)`` is in voxels when ``spacing`` is None; with ``spacing``
    (sD, sH, sW) mm it is in mm (channel k in mm along axis k + 2). The determinant itself does not
    depend on the units (it is invariant to the diagonal change of variables). Derivatives are
    central differences, one-sided at the border (``torch.gradient``).
    """
    field = displacement
    if spacing is not None:
        field = field / torch.tensor([float(s) for s in spacing], dtype=field.dtype, device=field.device).view(1, 3, 1, 1, 1)
    derivatives = torch.gradient(field, dim=(2, 3, 4))  # d u / d axis, each (N, 3, D, H, W)
    matrix = torch.stack(derivatives, dim=2).permute(0, 3, 4, 5, 1, 2)  # (N, D, H, W, component, axis)
    matrix = matrix + torch.eye(3, dtype=field.dtype, device=field.device)
    return determinant_3x3(matrix).unsqueeze(1)

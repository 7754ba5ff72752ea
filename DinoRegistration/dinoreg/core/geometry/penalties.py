"""Smoothness penalties of displacement fields: diffusion (first derivatives) and bending energy
(second derivatives), in mm per mm when a spacing is given."""

from __future__ import annotations

from typing import Sequence

import torch


def _to_mm(displacement: torch.Tensor, spacing: Sequence[float] | None) -> tuple[torch.Tensor, list[float]]:
    """The field in mm (channel k times spacing[k]) and the per-axis voxel sizes (sD, sH, sW)."""
    if spacing is None:
        return displacement, [1.0, 1.0, 1.0]
    sizes = [float(s) for s in spacing]
    scale = torch.tensor(sizes, dtype=displacement.dtype, device=displacement.device).view(1, 3, 1, 1, 1)
    return displacement * scale, sizes


def diffusion_penalty(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Sum over axes a of the mean squared forward difference ``(d u / d x_a)^2`` (a scalar).

    ``displacement`` ``(N, 3, D, H, W)`` in voxels; with ``spacing`` (sD, sH, sW) mm the derivatives
    are mm per mm (dimensionless, comparable between grids), otherwise voxel per voxel. The mean
    runs over batch, channels and the n - 1 differences of each axis. Forward differences (not
    MONAI's ``DiffusionLoss`` central ones, which ignore the checkerboard mode) so that
    :func:`diffusion_gradient` is its exact gradient.
    """
    field, sizes = _to_mm(displacement, spacing)
    energy = field.new_zeros(())
    for axis, size in zip((2, 3, 4), sizes):
        n = field.shape[axis]
        if n > 1:
            difference = field.narrow(axis, 1, n - 1) - field.narrow(axis, 0, n - 1)
            energy = energy + difference.square().mean() / size ** 2
    return energy


def diffusion_gradient(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Gradient of :func:`diffusion_penalty` with respect to ``displacement``, in closed form.

    A scaled negative discrete Laplacian with Neumann borders: far cheaper than autograd through
    slicing (ConvexAdam's Adam loop adds it to the data gradient directly).
    """
    field, sizes = _to_mm(displacement, spacing)
    gradient = torch.zeros_like(field)
    for axis, size in zip((2, 3, 4), sizes):
        n = field.shape[axis]
        if n > 1:
            count = field.numel() // n * (n - 1)
            difference = (field.narrow(axis, 1, n - 1) - field.narrow(axis, 0, n - 1)) * (2.0 / (count * size ** 2))
            gradient.narrow(axis, 1, n - 1).add_(difference)
            gradient.narrow(axis, 0, n - 1).sub_(difference)
    if spacing is not None:
        gradient = gradient * torch.tensor([float(s) for s in spacing], dtype=field.dtype,
                                           device=field.device).view(1, 3, 1, 1, 1)
    return gradient


def _second_difference(field: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Central second difference along tensor axes a, b (>= 2), every spatial axis cropped to [1:-1]."""
    def part(shifts: dict[int, int]) -> torch.Tensor:
        index = [slice(None), slice(None)]
        for axis in range(2, field.dim()):
            shift = shifts.get(axis, 0)
            index.append(slice(1 + shift, field.shape[axis] - 1 + shift))
        return field[tuple(index)]

    if a == b:
        return part({a: 1}) - 2.0 * part({}) + part({a: -1})
    return (part({a: 1, b: 1}) - part({a: 1, b: -1}) - part({a: -1, b: 1}) + part({a: -1, b: -1})) / 4.0


def bending_energy(displacement: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Mean over voxels, batch and channels of ``sum_a (d2u/dx_a^2)^2 + 2 sum_{a<b} (d2u/dx_a dx_b)^2``.

    Same stencils and reduction as ``monai.losses.BendingEnergyLoss()`` (the tests check equality
    when ``spacing`` is None), plus physical units: with ``spacing`` (sD, sH, sW) mm the field is
    taken in mm and derivatives per mm. Every spatial size must be > 2.
    """
    if any(int(n) <= 2 for n in displacement.shape[2:]):
        raise ValueError(f"bending energy needs every spatial size > 2, got {tuple(displacement.shape[2:])}")
    field, sizes = _to_mm(displacement, spacing)
    energy = field.new_zeros(())
    for a in range(3):
        for b in range(a, 3):
            term = _second_difference(field, a + 2, b + 2) / (sizes[a] * sizes[b])
            energy = energy + (1.0 if a == b else 2.0) * term.square()
    return energy.mean()

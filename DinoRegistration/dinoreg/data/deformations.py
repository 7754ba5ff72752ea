"""Random smooth deformations for training pairs (voxel units, torch, any device).

Fields are voxel displacements ``(N, 3, D, H, W)``: channel ``k`` is the displacement in voxels
along tensor axis ``k + 2`` (the geometry core's convention). Velocity fields are smooth noise
(a sum of octaves of Gaussian noise drawn on a coarse lattice and upsampled trilinearly, i.e.
Perlin-like), made diffeomorphic by scaling-and-squaring.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dinoreg.core.geometry import integrate_velocity, warp  # noqa: F401 (re-exported for the generators)


def smooth_noise(shape: Sequence[int], channels: int, cell_voxels: float, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit-variance Gaussian noise on a lattice of ``cell_voxels`` spacing, upsampled trilinearly.

    Returns ``(1, channels, *shape)``, float32; features have about ``cell_voxels`` voxels of size.
    """
    coarse = [max(2, int(round(size / cell_voxels)) + 1) for size in shape]
    noise = torch.randn((1, channels, *coarse), generator=generator, device=device)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float drawn uniformly from [low, high) with ``generator`` (reproducible)."""
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def random_velocity(shape: Sequence[int], max_amplitude_voxels: float, generator: torch.Generator,
                    cell_voxels: Sequence[float] = (16.0, 8.0), device: torch.device | str = "cpu") -> torch.Tensor:
    """A smooth stationary velocity field ``(1, 3, *shape)`` in voxels.

    One octave per entry of ``cell_voxels`` (coarse to fine, each half the weight of the previous);
    the whole field is scaled so its largest component is a uniform draw in [0, max_amplitude_voxels].
    """
    field = torch.zeros((1, 3, *shape), device=device)
    for octave, cell in enumerate(cell_voxels):
        field = field + smooth_noise(shape, 3, cell, generator, device) / (2 ** octave)
    amplitude = uniform(generator, 0.0, max_amplitude_voxels)
    return field * (amplitude / field.abs().amax().clamp(min=1e-6))


def random_affine_matrix(generator: torch.Generator, max_rotation_deg: float, max_scaling: float,
                         max_translation_voxels: float, shape: Sequence[int]) -> torch.Tensor:
    """A 3x4 voxel-space affine (about the volume centre) as a displacement-generating matrix.

    Rotation angles uniform in +-max_rotation_deg per axis, scaling factors uniform in
    [1 - max_scaling, 1 + max_scaling] per axis, translation uniform in +-max_translation_voxels.
    """
    angles = [math.radians(uniform(generator, -max_rotation_deg, max_rotation_deg)) for _ in range(3)]
    rotation = torch.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        turn = torch.eye(3)
        turn[a, a] = turn[b, b] = math.cos(angle)
        turn[a, b], turn[b, a] = -math.sin(angle), math.sin(angle)
        rotation = turn @ rotation
    scaling = torch.diag(torch.tensor([uniform(generator, 1 - max_scaling, 1 + max_scaling) for _ in range(3)]))
    matrix = rotation @ scaling
    translation = torch.tensor([uniform(generator, -max_translation_voxels, max_translation_voxels) for _ in range(3)])
    centre = (torch.tensor([float(s) for s in shape]) - 1) / 2
    offset = centre + translation - matrix @ centre
    return torch.cat([matrix, offset[:, None]], dim=1)


def affine_displacement(matrix: torch.Tensor, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Voxel displacement ``(1, 3, *shape)`` of ``x -> A x + b`` (``matrix`` 3x4, voxel indices)."""
    axes = [torch.arange(size, dtype=torch.float32, device=device) for size in shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, D, H, W)
    mapped = torch.einsum("rc,c...->r...", matrix[:, :3].to(device), points) + matrix[:, 3].to(device).view(3, 1, 1, 1)
    return (mapped - points).unsqueeze(0)


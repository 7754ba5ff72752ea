"""Torch spatial operations: sampling a volume at physical points, voxel <-> normalised units,
scaling-and-squaring, warping of voxel-unit fields.

Two unit systems appear here:
- physical LPS millimetres (used by ``transforms.py`` and every exported file);
- voxel displacements of one grid, stored as tensors ``(N, 3, K, J, I)`` whose channels are
  ``(di, dj, dk)`` in voxels (the order grid_sample wants in its last dimension: x=i, y=j, z=k).

grid_sample with ``align_corners=True`` maps normalised -1 to the centre of voxel 0 and +1 to the
centre of voxel N-1, so one voxel is 2/(N-1) normalised units.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .volume import Grid


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import InputError

        raise InputError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(name)


def identity_grid_normalised(shape_kji: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """grid_sample grid of the identity, shape ``(1, K, J, I, 3)``, last axis (x=i, y=j, z=k)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape_kji]
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([i, j, k], dim=-1).unsqueeze(0)


def voxel_to_normalised_scale(shape_kji: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Factors (for i, j, k) turning voxel displacements into normalised grid_sample units."""
    sizes = torch.tensor([shape_kji[2], shape_kji[1], shape_kji[0]], dtype=torch.float32, device=device)
    return 2.0 / torch.clamp(sizes - 1.0, min=1.0)


def warp_with_voxel_displacement(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
                                 padding_mode: str = "border") -> torch.Tensor:
    """Resample ``image (N, C, K, J, I)`` at ``x + displacement(x)``.

    ``displacement`` is ``(N, 3, K, J, I)`` in voxels of the image's own grid, channels (di, dj, dk).
    ``mode='bilinear'`` is trilinear in 3D; use ``'nearest'`` for label maps.
    """
    shape = tuple(displacement.shape[2:])
    scale = voxel_to_normalised_scale(shape, displacement.device)
    grid = identity_grid_normalised(shape, displacement.device) + displacement.permute(0, 2, 3, 4, 1) * scale
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def compose_voxel_displacements(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> y + second(y)`` with ``y = x + first(x)`` (first applied first)."""
    return first + warp_with_voxel_displacement(second, first)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp(v) of a stationary velocity field in voxel units.

    Returns a displacement in the same units; the result is diffeomorphic for smooth ``v``.
    """
    displacement = velocity / (2.0 ** steps)
    for _ in range(steps):
        displacement = compose_voxel_displacements(displacement, displacement)
    return displacement


def invert_voxel_displacement(displacement: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Numerical inverse ``v`` with ``x + v(x) + u(x + v(x)) = x`` by fixed-point iteration.

    Converges for fields whose Jacobian is positive (no folding); ``u`` in voxels (N, 3, K, J, I).
    """
    inverse = -displacement.clone()
    for _ in range(iterations):
        inverse = -warp_with_voxel_displacement(displacement, inverse)
    return inverse


def voxel_displacement_to_physical(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Voxel displacement ``(N, 3, K, J, I)`` (di, dj, dk) to LPS mm ``(N, 3, K, J, I)`` (dx, dy, dz).

    Physical = Direction @ diag(spacing) @ (di, dj, dk).
    """
    matrix = torch.as_tensor(grid.direction @ np.diag(grid.spacing), dtype=displacement.dtype, device=displacement.device)
    return torch.einsum("rc,nc...->nr...", matrix, displacement)


def physical_displacement_to_voxel(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`voxel_displacement_to_physical`."""
    matrix = torch.as_tensor(np.linalg.inv(grid.direction @ np.diag(grid.spacing)), dtype=displacement.dtype,
                             device=displacement.device)
    return torch.einsum("rc,nc...->nr...", matrix, displacement)


def grid_points(grid: Grid, k_range: tuple[int, int] | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Physical LPS points of the voxel centres of ``grid`` (optionally slices k0..k1), ``(K, J, I, 3)`` float32."""
    k0, k1 = k_range or (0, grid.shape[0])
    matrix = torch.as_tensor(grid.direction @ np.diag(grid.spacing), dtype=torch.float32, device=device)
    origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=device)
    i = torch.arange(grid.shape[2], device=device, dtype=torch.float32)[:, None] * matrix[:, 0]
    j = torch.arange(grid.shape[1], device=device, dtype=torch.float32)[:, None] * matrix[:, 1]
    k = torch.arange(k0, k1, device=device, dtype=torch.float32)[:, None] * matrix[:, 2] + origin
    return k[:, None, None, :] + j[None, :, None, :] + i[None, None, :, :]


def physical_to_normalised(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Physical LPS points ``(..., 3)`` to grid_sample coordinates of ``grid`` (x=i, y=j, z=k)."""
    sizes = np.asarray(grid.size, dtype=np.float64)
    scale = 2.0 / np.maximum(sizes - 1.0, 1.0)
    to_normalised = np.diag(scale) @ grid.physical_to_index[:3]  # 3x4: index scaled, then shifted by -1
    matrix = torch.as_tensor(to_normalised[:, :3], dtype=points.dtype, device=points.device)
    offset = torch.as_tensor(to_normalised[:, 3] - 1.0, dtype=points.dtype, device=points.device)
    return points @ matrix.T + offset


def sample_at_points(image: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image (1, C, K, J, I)`` on ``grid`` at physical points ``(K', J', I', 3)``.

    Returns ``(1, C, K', J', I')``. As in ITK's interpolators, a point whose continuous index lies
    outside [-0.5, N-0.5] on any axis gets 0, and inside it the edge voxels are replicated.
    """
    normalised = physical_to_normalised(points.to(image.dtype), grid).unsqueeze(0)
    values = F.grid_sample(image, normalised, mode=mode, padding_mode="border", align_corners=True)
    half_voxel = voxel_to_normalised_scale(grid.shape, points.device) / 2.0
    inside = (normalised.abs() <= 1.0 + half_voxel + 1e-6).all(dim=-1)
    return values * inside.unsqueeze(1).to(values.dtype)


def voxels_per_axis(value: int, spacing, minimum: int = 1) -> tuple[int, int, int]:
    """``value`` voxels of a grid's finest axis expressed per array axis (k, j, i).

    ``spacing`` is (si, sj, sk) in mm (the order of ``Grid.spacing``); None means isotropic. Used
    so neighbourhoods and control grids cover about the same millimetres on anisotropic grids.
    """
    if spacing is None:
        return (max(minimum, int(value)),) * 3
    si, sj, sk = (float(s) for s in spacing)
    finest = min(si, sj, sk)
    return tuple(max(minimum, int(round(value * finest / s))) for s in (sk, sj, si))  # type: ignore[return-value]


def resize_field(field: torch.Tensor, shape_kji: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resize of any (N, C, K, J, I) tensor to a new grid shape (corners aligned)."""
    if tuple(field.shape[2:]) == tuple(shape_kji):
        return field
    return F.interpolate(field, size=tuple(shape_kji), mode="trilinear", align_corners=True)

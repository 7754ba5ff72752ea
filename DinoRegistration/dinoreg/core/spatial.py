"""Torch spatial operations in physical space: sampling a volume at physical points, voxel <->
physical displacements, the grid's voxel-centre points.

Operations on voxel displacement fields themselves (warp, compose, scaling and squaring, inverse,
Jacobian, penalties) live in ``geometry/``, their single home.

Two unit systems appear here:
- physical LPS millimetres (used by ``transforms.py`` and every exported file): components
  (dx, dy, dz), ITK's order;
- voxel displacements of one grid, tensors ``(N, 3, K, J, I)`` in voxels with the engine's one
  channel convention (see ``geometry``: channel c along tensor axis c + 2, i.e. (dk, dj, di)).
:func:`voxel_displacement_to_physical` and :func:`physical_displacement_to_voxel` are the only
place where voxel channels meet the (x, y, z) order of physical space.

grid_sample with ``align_corners=True`` maps normalised -1 to the centre of voxel 0 and +1 to the
centre of voxel N-1, so one voxel is 2/(N-1) normalised units.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.core.geometry.sampling import grid_sample_3d
from dinoreg.core.volume import Grid
from dinoreg.errors import InputError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(name)


def voxel_displacement_to_physical(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Voxel displacement ``(N, 3, K, J, I)`` of ``grid`` (channels (dk, dj, di), the ``geometry``
    convention) to LPS mm ``(N, 3, K, J, I)`` (channels dx, dy, dz).

    Physical = Direction @ diag(spacing) @ (di, dj, dk): the matrix's columns are in (i, j, k)
    order, so the channels are reversed to (di, dj, dk) here, the one place where that order appears.
    """
    matrix = torch.as_tensor(grid.direction @ np.diag(grid.spacing), dtype=displacement.dtype, device=displacement.device)
    return torch.einsum("rc,nc...->nr...", matrix, displacement.flip(1))


def physical_displacement_to_voxel(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`voxel_displacement_to_physical`: LPS mm ``(N, 3, K, J, I)`` (dx, dy, dz) to
    voxels of ``grid`` with channels (dk, dj, di)."""
    matrix = torch.as_tensor(np.linalg.inv(grid.direction @ np.diag(grid.spacing)), dtype=displacement.dtype,
                             device=displacement.device)
    return torch.einsum("rc,nc...->nr...", matrix, displacement).flip(1)  # rows (di, dj, dk) -> (dk, dj, di)


def grid_points(grid: Grid, k_range: tuple[int, int] | None = None, device: torch.device | str = "cpu",
                then: np.ndarray | None = None) -> torch.Tensor:
    """Physical LPS points of the voxel centres of ``grid`` (optionally slices k0..k1), ``(K, J, I, 3)`` float32.

    ``then``: a 4x4 homogeneous LPS map applied to the points, at no extra cost (folded into the
    index-to-physical matrix instead of a pass over every point)."""
    k0, k1 = k_range or (0, grid.shape[0])
    index_to_physical = grid.index_to_physical if then is None else np.asarray(then, dtype=np.float64) @ grid.index_to_physical
    matrix = torch.as_tensor(index_to_physical[:3, :3], dtype=torch.float32, device=device)
    origin = torch.as_tensor(index_to_physical[:3, 3], dtype=torch.float32, device=device)
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
    return torch.addmm(offset, points.reshape(-1, 3), matrix.T).view(points.shape)  # one pass: ~30 % faster than @ then +


def sample_at_points(image: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image (1, C, K, J, I)`` on ``grid`` at physical points ``(K', J', I', 3)``.

    Returns ``(1, C, K', J', I')``. As in ITK's interpolators, a point whose continuous index lies
    outside [-0.5, N-0.5] on any axis gets 0, and inside it the edge voxels are replicated.
    """
    normalised = physical_to_normalised(points.to(image.dtype), grid).unsqueeze(0)
    values = grid_sample_3d(image, normalised, mode, "border")
    sizes = torch.tensor(grid.size, dtype=torch.float32, device=points.device)  # (i, j, k): grid_sample's x, y, z
    half_voxel = 1.0 / torch.clamp(sizes - 1.0, min=1.0)
    inside = (normalised.abs() - half_voxel).amax(dim=-1) <= 1.0 + 1e-6
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

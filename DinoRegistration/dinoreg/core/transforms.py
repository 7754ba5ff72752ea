"""The transform model: an ordered chain of affine maps and dense displacement fields.

Every transform here maps points of the FIXED image to points of the MOVING image (LPS mm): the
resampling direction used by ITK, grid_sample and Slicer's "FromParent". A registration result is
usually ``Transform([DenseField(u), AffineMap(A)])``: first ``y = x + u(x)``, then ``A y``.
The inverse maps moving points back to fixed points.

Conversion to and from ITK files lives in ``itk_files.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dinoreg.core import geometry, spatial
from dinoreg.core.affine_map import AffineMap
from dinoreg.core.geometry.jacobian import determinant_3x3
from dinoreg.core.volume import Grid, Volume


@dataclass
class DenseField:
    """``y = x + u(x)`` with ``u`` a displacement in LPS mm sampled on ``grid``.

    ``displacement`` is float32 ``(K, J, I, 3)`` (components x, y, z in LPS). Between voxel
    centres ``u`` is trilinear; outside the grid it is zero (as ITK's DisplacementFieldTransform).
    """

    displacement: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        self.displacement = np.ascontiguousarray(self.displacement, dtype=np.float32)
        if self.displacement.shape != (*self.grid.shape, 3):
            raise ValueError(f"displacement shape {self.displacement.shape} does not fit grid {self.grid.shape}")

    @staticmethod
    def from_voxel_displacement(displacement: torch.Tensor, grid: Grid) -> "DenseField":
        """From a voxel displacement ``(1, 3, K, J, I)`` of ``grid`` (channels as in ``geometry``: (dk, dj, di))."""
        physical = spatial.voxel_displacement_to_physical(displacement.detach().float(), grid)
        return DenseField(physical[0].permute(1, 2, 3, 0).cpu().numpy(), grid)

    def as_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(1, 3, K, J, I)`` physical displacement tensor."""
        return torch.from_numpy(self.displacement).to(device).permute(3, 0, 1, 2).unsqueeze(0)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Map physical points ``(K', J', I', 3)``."""
        field_tensor = self.as_tensor(points.device)
        sampled = spatial.sample_at_points(field_tensor, self.grid, points)
        return points + sampled[0].permute(1, 2, 3, 0)

    def resampled_to(self, grid: Grid) -> "DenseField":
        """The same physical map, sampled on another grid (trilinear)."""
        if grid.same_as(self.grid):
            return self
        return DenseField(self.sampled_on(grid).numpy(), grid)

    def sampled_on(self, grid: Grid, device: torch.device | str = "cpu", matrix: np.ndarray | None = None) -> torch.Tensor:
        """``u`` at the voxel centres of ``grid``: ``(K, J, I, 3)`` LPS mm (float32), 0 outside this field's grid.

        When ``grid`` covers the same box as the field's grid (our methods' fields live on a coarser
        grid over the fixed image's box), trilinear upsampling: the same values as sampling at the
        points (to float rounding), about 4x faster on the CPU than ``grid_sample`` at every point.
        ``matrix``: a 3x3 linear map applied to the displacement vectors (on the field's own grid,
        before the upsampling: interpolation is linear, so the result is ``matrix @ u(x)``).
        """
        field_tensor = self.as_tensor(device)
        if matrix is not None:
            linear = torch.as_tensor(np.asarray(matrix), dtype=field_tensor.dtype, device=field_tensor.device)
            field_tensor = torch.einsum("rc,nc...->nr...", linear, field_tensor)
        if grid.same_box_as(self.grid):
            if grid.same_as(self.grid):
                return field_tensor[0].permute(1, 2, 3, 0)
            upsampled = F.interpolate(field_tensor, size=grid.shape, mode="trilinear", align_corners=True)
            return upsampled[0].permute(1, 2, 3, 0)
        sampled = spatial.sample_at_points(field_tensor, self.grid, spatial.grid_points(grid, device=device))
        return sampled[0].permute(1, 2, 3, 0)

    def inverse(self, iterations: int = 30, max_voxels: int = 1_000_000) -> "DenseField":
        """Numerical inverse: ``x + v(x)`` undoes ``x + u(x)`` on the same grid (see :meth:`inverse_with_residual`)."""
        return self.inverse_with_residual(iterations, max_voxels)[0]

    def inverse_with_residual(self, iterations: int = 30, max_voxels: int = 1_000_000,
                              tolerance_voxels: float = 0.002) -> tuple["DenseField", float]:
        """Numerical inverse (``geometry.invert``) and its residual.

        Returns the inverse field on this grid and the 99th percentile over the grid of
        ``|v(x) + u(x + v(x))|`` in voxels of the grid it was computed on (0 = exact). Iterates until
        that percentile is below ``tolerance_voxels`` (at most ``iterations`` steps; fields from our
        methods take 8-10). (The maximum is no stopping rule: points that leave the grid keep a
        residual.) Grids larger than ``max_voxels`` are inverted on a coarser grid over the same box and
        the result is resampled back (fields from our methods are smooth at that scale).
        """
        work_grid = self.grid
        if np.prod(self.grid.size) > max_voxels:
            factor = (np.prod(self.grid.size) / max_voxels) ** (1.0 / 3.0)
            work_grid = self.grid.with_spacing(self.grid.spacing * factor)
        field_on_work_grid = self.resampled_to(work_grid)
        field = spatial.physical_displacement_to_voxel(field_on_work_grid.as_tensor(), work_grid)
        inverse, residual = geometry.invert(field, iterations, tolerance_voxels, quantile=0.99)
        result = DenseField.from_voxel_displacement(inverse, work_grid).resampled_to(self.grid)
        return result, float(torch.quantile(residual.flatten()[:: max(1, residual.numel() // 1_000_000)], 0.99))


#: one step of a chain (``typing.Union``: ``X | Y`` at runtime needs Python 3.10, Slicer 5.6/5.8 ship 3.9)
Step = Union[AffineMap, DenseField]


@dataclass
class Transform:
    """A chain of steps applied in order to FIXED points, giving MOVING points (LPS mm)."""

    steps: list[Step] = field(default_factory=list)

    @property
    def affine(self) -> AffineMap | None:
        """The last affine step, if any."""
        affines = [s for s in self.steps if isinstance(s, AffineMap)]
        return affines[-1] if affines else None

    @property
    def dense(self) -> DenseField | None:
        """The dense field step, if any."""
        fields = [s for s in self.steps if isinstance(s, DenseField)]
        return fields[-1] if fields else None

    def then(self, other: "Transform") -> "Transform":
        """Points go through ``self`` first, then ``other``."""
        return Transform(self.steps + other.steps)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Map physical points ``(K, J, I, 3)`` through every step."""
        for step in self.steps:
            points = step.apply(points)
        return points

    def inverse(self, iterations: int = 30) -> "Transform":
        """Moving -> fixed: steps inverted in reverse order (dense fields numerically)."""
        return self.inverse_with_residual(iterations)[0]

    def inverse_with_residual(self, iterations: int = 30) -> tuple["Transform", float]:
        """The inverse and the worst residual of its dense steps (voxels, see ``DenseField.inverse_with_residual``; 0 without)."""
        steps: list[Step] = []
        worst = 0.0
        for step in reversed(self.steps):
            if isinstance(step, AffineMap):
                steps.append(step.inverse())
            else:
                inverse, residual = step.inverse_with_residual(iterations)
                steps.append(inverse)
                worst = max(worst, residual)
        return Transform(steps), worst

    def mapped_points(self, grid: Grid, device: torch.device | str = "cpu", k_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Where each voxel centre of ``grid`` lands: ``(K, J, I, 3)`` LPS mm (float32).

        Fast paths: a dense field that is the FIRST step (the points are still the grid's voxel
        centres; after any other step they are not, and the field must be interpolated where the
        points went) is added without interpolation when defined on ``grid`` itself, and upsampled
        (:meth:`DenseField.sampled_on`) when defined on a grid over the same box; consecutive
        affine steps are folded into one matrix.
        """
        steps = fold_affines(self.steps)
        first = steps[0] if steps else None
        if (isinstance(first, DenseField) and k_range is None and first.grid.same_box_as(grid)
                and not first.grid.same_as(grid)):
            # A(x + u(x)) + t = (A x + t) + A u(x): the affine is folded into the grid's points and
            # applied to u on its own (coarser) grid, instead of a pass over every mapped point
            folded = 2 if len(steps) > 1 and isinstance(steps[1], AffineMap) else 1
            then = steps[1] if folded == 2 else AffineMap()
            points = spatial.grid_points(grid, None, device, then=then.homogeneous)
            points = points + first.sampled_on(grid, device, matrix=then.matrix)
            return Transform(steps[folded:]).apply(points)
        points = spatial.grid_points(grid, k_range, device)
        k0, k1 = k_range or (0, grid.shape[0])
        for position, step in enumerate(steps):
            if position == 0 and isinstance(step, DenseField) and step.grid.same_as(grid):
                points = points + torch.from_numpy(step.displacement[k0:k1]).to(device)
            else:
                points = step.apply(points)
        return points


def fold_affines(steps: list[Step]) -> list[Step]:
    """The same chain with runs of consecutive affine steps multiplied into one."""
    folded: list[Step] = []
    for step in steps:
        if isinstance(step, AffineMap) and folded and isinstance(folded[-1], AffineMap):
            folded[-1] = folded[-1].then(step)
        else:
            folded.append(step)
    return folded


def warp_volume(moving: Volume, transform: Transform, target: Grid, mode: str = "linear",
                device: torch.device | str = "cpu", default_value: float = 0.0, slab_voxels: int = 8_000_000) -> Volume:
    """Resample ``moving`` onto ``target`` through ``transform`` (target point -> moving point).

    ``mode`` is 'linear' (trilinear, images) or 'nearest' (label maps). The moving pixel type is
    kept (rounded for integer types). Processes the target in slabs of k so memory stays bounded.
    """
    return warp_volumes([(moving, mode)], transform, target, device, default_value, slab_voxels)[0]


def resample_without_transform(moving: Volume, target: Grid, mode: str = "linear") -> Volume:
    """``moving`` on ``target`` with no transform (physical points map to themselves): the same
    values as ``warp_volume(moving, Transform(), target, mode)`` (ITK's convention: 0 outside),
    by SimpleITK's multi-threaded resampler, about 3x faster on CPU for the unregistered views.
    Interpolated as float, then cast to the moving pixel type with rounding (ITK would truncate)."""
    interpolator = sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor
    image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32) if mode == "linear" else moving.to_sitk()
    resampled = sitk.Resample(image, target.to_sitk_reference(), sitk.Transform(), interpolator, 0.0,
                              image.GetPixelID())
    return Volume(cast_like(sitk.GetArrayFromImage(resampled), moving.array.dtype), target)


def warp_volumes(volumes: list[tuple[Volume, str]], transform: Transform, target: Grid,
                 device: torch.device | str = "cpu", default_value: float = 0.0,
                 slab_voxels: int = 8_000_000, mapped: torch.Tensor | None = None) -> list[Volume]:
    """:func:`warp_volume` for several ``(volume, mode)`` pairs through one transform: the mapped
    points of each slab are computed once and sampled in every volume (an image and its labels).
    ``mapped``: ``transform.mapped_points(target)`` when the caller already has them (else computed)."""
    sources = [torch.from_numpy(np.ascontiguousarray(v.array, dtype=np.float32)).to(device)[None, None] for v, _ in volumes]
    outs = [np.empty(target.shape, dtype=np.float32) for _ in volumes]
    slab = max(1, slab_voxels // (target.shape[1] * target.shape[2]))
    for k0 in range(0, target.shape[0], slab):
        k1 = min(target.shape[0], k0 + slab)
        points = mapped[k0:k1] if mapped is not None else transform.mapped_points(target, device, (k0, k1))
        for (volume, mode), source, out in zip(volumes, sources, outs):
            torch_mode = "bilinear" if mode == "linear" else "nearest"
            sampled = sample_with_default(source, volume.grid, points, torch_mode, default_value)
            out[k0:k1] = sampled[0, 0].cpu().numpy()
    return [Volume(cast_like(out, volume.array.dtype), target) for (volume, _), out in zip(volumes, outs)]


def sample_with_default(source: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str, default_value: float) -> torch.Tensor:
    """Sample at physical points, giving ``default_value`` outside the image (ITK's convention)."""
    if default_value == 0.0:
        return spatial.sample_at_points(source, grid, points, mode)
    ones = torch.ones_like(source[:, :1])
    values = spatial.sample_at_points(torch.cat([source - default_value, ones], 1), grid, points, mode)
    return values[:, :-1] + default_value


def cast_like(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float array to ``dtype``, rounding and clipping for integer types."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(dtype)


def transform_jacobian(transform: Transform, grid: Grid, device: torch.device | str = "cpu",
                         slab: int = 16, mapped: torch.Tensor | None = None) -> np.ndarray:
    """Determinant of the Jacobian of ``transform`` at each voxel of ``grid`` (float32, [k, j, i]).

    Central differences in index space (one-sided at the grid border), converted to physical
    derivatives with ``(Direction diag(spacing))^-1``. 1 means volume preserved, <= 0 folding.
    Computed in slabs of k (with a one-slice halo) so memory stays bounded. ``mapped``:
    ``transform.mapped_points(grid)`` when the caller already has them (else computed per slab).
    """
    to_index = torch.as_tensor(np.linalg.inv(grid.direction @ np.diag(grid.spacing)), dtype=torch.float32, device=device)
    depth = grid.shape[0]
    out = np.empty(grid.shape, dtype=np.float32)
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        h0, h1 = max(0, k0 - 1), min(depth, k1 + 1)
        points = mapped[h0:h1] if mapped is not None else transform.mapped_points(grid, device, (h0, h1))
        d_dk = torch.gradient(points, dim=0)[0] if h1 - h0 > 1 else torch.zeros_like(points)
        d_dj, d_di = torch.gradient(points, dim=(1, 2))
        d_index = torch.stack([d_di, d_dj, d_dk], dim=-1)[k0 - h0:k1 - h0]  # (..., 3 outputs, 3 index axes)
        out[k0:k1] = determinant_3x3(d_index @ to_index).cpu().numpy()
    return out

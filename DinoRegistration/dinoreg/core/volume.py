"""Volumes and grids in physical space (ITK convention: LPS millimetres).

A ``Grid`` is the geometry of a 3D image: its size, origin, spacing and direction, exactly as
SimpleITK stores them. A ``Volume`` is a grid plus a numpy array.

Conventions (see shared DESIGN.md section 2):
- physical points are LPS millimetres, as in ITK and every file format we read;
- arrays are indexed ``[k, j, i]`` (slowest axis first) while ``Grid.size`` is ``(i, j, k)``;
- the continuous index ``p = (i, j, k)`` of a physical point ``x`` solves
  ``x = origin + direction @ diag(spacing) @ p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image. ``size`` is (i, j, k) voxels; other fields are LPS mm."""

    size: tuple[int, int, int]
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "spacing", np.asarray(self.spacing, dtype=np.float64).reshape(3))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(k, j, i)`` of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping continuous index (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def physical_to_index(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping LPS mm to continuous index (i, j, k, 1)."""
        return np.linalg.inv(self.index_to_physical)

    @property
    def extent_mm(self) -> np.ndarray:
        """Physical length along each grid axis (i, j, k), centre to centre of the end voxels."""
        return (np.asarray(self.size) - 1) * self.spacing

    def physical_points(self) -> np.ndarray:
        """LPS coordinates of every voxel centre, array of shape ``(k, j, i, 3)``, float64."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        index = np.stack([i, j, k], axis=-1).astype(np.float64)
        return index @ (self.direction @ np.diag(self.spacing)).T + self.origin

    def centre(self) -> np.ndarray:
        """Physical LPS position of the grid centre in mm."""
        return self.index_to_physical[:3, :3] @ ((np.asarray(self.size) - 1) / 2.0) + self.origin

    def with_spacing(self, spacing_mm: float | tuple[float, float, float]) -> "Grid":
        """A grid covering the same physical box with (about) the given spacing in mm.

        The direction and the centre stay; the size is rounded so the extent is kept.
        """
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        size = np.maximum(1, np.round(self.extent_mm / target).astype(int) + 1)
        new_spacing = np.where(size > 1, self.extent_mm / np.maximum(size - 1, 1), target)
        centre = self.centre()
        origin = centre - self.direction @ (new_spacing * (size - 1) / 2.0)
        return Grid(tuple(size), origin, new_spacing, self.direction)

    def same_as(self, other: "Grid", tolerance_mm: float = 1e-3) -> bool:
        """True when both grids have the same size and (within tolerance) geometry."""
        return (
            self.size == other.size
            and np.allclose(self.origin, other.origin, atol=tolerance_mm)
            and np.allclose(self.spacing, other.spacing, atol=tolerance_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def same_box_as(self, other: "Grid", tolerance_mm: float = 1e-3) -> bool:
        """True when both grids have voxel centres on the same corners of the same box (same origin,
        direction and extent, any sizes): one is the other's :meth:`with_spacing`, so a field on one
        is resampled onto the other by plain trilinear interpolation with ``align_corners=True``."""
        return (
            np.allclose(self.origin, other.origin, atol=tolerance_mm)
            and np.allclose(self.extent_mm, other.extent_mm, atol=tolerance_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def to_sitk_reference(self) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for resampling onto this grid)."""
        image = sitk.Image(list(self.size), sitk.sitkUInt8)
        copy_geometry_to_sitk(self, image)
        return image

    @staticmethod
    def from_sitk(image: sitk.Image) -> "Grid":
        return Grid(
            size=tuple(image.GetSize()),
            origin=np.array(image.GetOrigin()),
            spacing=np.array(image.GetSpacing()),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )

    def describe(self) -> str:
        """Short human description, e.g. '256x256x25 voxels of 0.78x0.78x6.50 mm'."""
        size = "x".join(str(s) for s in self.size)
        spacing = "x".join(f"{s:.2f}" for s in self.spacing)
        return f"{size} voxels of {spacing} mm"


def copy_geometry_to_sitk(grid: Grid, image: sitk.Image) -> None:
    """Set origin, spacing and direction of a SimpleITK image from a grid (in place)."""
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetDirection(tuple(float(v) for v in grid.direction.ravel()))


@dataclass
class Volume:
    """A scalar 3D image: ``array`` indexed [k, j, i] on ``grid`` (LPS mm)."""

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.grid.shape:
            raise ValueError(f"array shape {self.array.shape} does not match grid shape {self.grid.shape}")

    @staticmethod
    def from_sitk(image: sitk.Image) -> "Volume":
        return Volume(sitk.GetArrayFromImage(image), Grid.from_sitk(image))

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        copy_geometry_to_sitk(self.grid, image)
        return image

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same grid holding another array."""
        return Volume(array, self.grid)

    @staticmethod
    def from_array_ras(array_kji: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> "Volume":
        """Wrap a header-less array as a volume whose i, j, k axes point along R, A, S.

        For arrays such as the voxelmorph scans (``vol[x, y, z]``, RAS, 1 mm), pass the array
        transposed to [k, j, i] order. In LPS that direction is diag(-1, -1, 1).
        """
        grid = Grid(array_kji.shape[::-1], np.zeros(3), np.asarray(spacing), np.diag([-1.0, -1.0, 1.0]))
        return Volume(array_kji, grid)

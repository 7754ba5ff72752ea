"""Checks that a pair of volumes can be registered at all, before any work starts.

Each failed check raises ``InputError`` with one line naming the problem and the fix. The reader
(``io.read_volume``) already rejects unreadable, truncated, non-3D, constant and non-finite files;
these checks also guard the API (``pipeline.register``), which takes volumes from memory.

Memory budget: a registration holds about ``BYTES_PER_FIXED_VOXEL`` bytes per voxel of the fixed
grid (outputs, dense fields, resampling coordinates) plus the moving image. The budget is 80 % of
this machine's RAM, or ``DINOREG_MEMORY_BUDGET_MB`` when set. Over budget the run stops before
allocating anything, with the fix (crop or resample the images coarser).
"""

from __future__ import annotations

import numpy as np

from dinoreg.core.volume import Volume
from dinoreg.errors import InputError
from dinoreg.io.file_checks import BUDGET_VARIABLE, BYTES_PER_FIXED_VOXEL, format_bytes, memory_budget_bytes

MIN_VOXELS_PER_AXIS = 4
MAX_SPACING_RATIO = 100.0


def check_registration_inputs(fixed: Volume, moving: Volume, fixed_mask: Volume | None = None,
                              moving_mask: Volume | None = None) -> None:
    """Raise ``InputError`` when the pair cannot be registered (see the module docstring)."""
    for volume, role in ((fixed, "fixed image"), (moving, "moving image")):
        check_shape_and_spacing(volume, role)
    for mask, role in ((fixed_mask, "fixed mask"), (moving_mask, "moving mask")):
        if mask is not None and not np.any(mask.array):
            raise InputError(f"{role} is empty (no non-zero voxel): give a mask that covers the anatomy, or none")
    check_memory_budget(fixed, moving)


def check_shape_and_spacing(volume: Volume, role: str) -> None:
    size, spacing = volume.grid.size, volume.grid.spacing
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{role} is {volume.grid.describe()}: at least {MIN_VOXELS_PER_AXIS} voxels along each "
                         "axis are needed; use a 3D volume, not a slice or a few voxels")
    if spacing.max() / spacing.min() > MAX_SPACING_RATIO:
        raise InputError(f"{role} has voxel spacing {'x'.join(f'{s:g}' for s in spacing)} mm "
                         f"({spacing.max() / spacing.min():.0f}:1): check the spacing in its header "
                         f"(ratios above {MAX_SPACING_RATIO:.0f}:1 are not images a registration can use)")


def estimated_bytes(fixed: Volume, moving: Volume) -> int:
    return BYTES_PER_FIXED_VOXEL * int(np.prod(fixed.grid.size)) + 4 * int(np.prod(moving.grid.size))


def check_memory_budget(fixed: Volume, moving: Volume) -> None:
    budget = memory_budget_bytes()
    needed = estimated_bytes(fixed, moving)
    if budget is not None and needed > budget:
        raise InputError(f"registering a {fixed.grid.describe()} fixed image needs about {format_bytes(needed)}, more "
                         f"than the memory budget of {format_bytes(budget)} ({BUDGET_VARIABLE}): crop the images to "
                         "the region of interest or resample them coarser first")

"""Fine-level refinement: a diffeomorphic Adam optimisation at (or near) the image's own resolution.

ConvexAdam (``convex_adam.py``) ends on a coarse lattice (the working grid, Adam on every 2nd
voxel): structures thinner than that lattice (cortex, white-matter folds) cannot be aligned.
This stage starts from ConvexAdam's displacement ``u0`` resampled onto a finer grid over the same
box, and optimises a stationary velocity ``v`` on that grid so that

    phi(x) = x + d(x) + u0(x + d(x)),   d = exp(smooth(v))   (scaling and squaring)

maps fixed voxels to moving voxels (``moving(phi(x))`` matches ``fixed(x)``). ``phi`` is a
composition of two diffeomorphisms (ConvexAdam's field is itself integrated when
``diffeomorphic``), so it does not fold.

Similarity (``similarity``): ``"ncc"``, the local normalised cross-correlation of the intensities
over a ``(2 * ncc_radius + 1)^3`` box window (same-contrast pairs; the usual choice at fine
resolution: SyN, FireANTs), or ``"mind"``, the SSD of MIND-SSC descriptors (any contrast).
Loss = ``-sum_masked(similarity) + regularisation * sum over voxels of the diffusion energy of d``
(mm per mm): sums, so that Adam's ``ADAM_EPSILON`` compares with per-voxel gradients and
identical images (zero gradient up to rounding) are left alone instead of dithered.

Written by hand: no installed library offers this step on our fields and grids (FireANTs/ANTs
are whole pipelines with their own I/O, not an optimiser over a given field).

Memory: autograd through scaling and squaring keeps about ``BYTES_PER_VOXEL`` bytes per voxel;
:func:`fine_spacing_for_budget` coarsens the refinement grid until it fits ``memory_mb``.
Shapes ``(1, C, K, J, I)``; displacements in voxels of the refinement grid, channels as in
``geometry``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from dinoreg.core import geometry
from dinoreg.core.filters import box_mean
from dinoreg.errors import InputError
from dinoreg.progress import Progress
from dinoreg.optim.adam import Adam
from dinoreg.optim.convex_adam import learning_rate_at

#: progress stage name reported by :func:`refine`
STAGE_REFINE = "fine refinement"
#: Adam's epsilon, in units of the per-voxel gradient of the summed loss (see the module docstring)
ADAM_EPSILON = 0.1
#: measured peak of the optimisation per refinement-grid voxel (float32, NCC, 4 squarings), bytes
BYTES_PER_VOXEL = 400
SIMILARITIES = ("ncc", "mind")
#: added to both sides of the local NCC ratio (intensities in [0, 1]; window variances of brain tissue ~1e-3)
NCC_EPSILON = 1e-5


@dataclass
class RefineSettings:
    """Parameters of :func:`refine` (lengths in mm unless named voxels)."""

    iterations: int = 30
    learning_rate: float = 0.5
    """Adam step, voxels of the refinement grid"""
    similarity: str = "ncc"
    """"ncc" (local NCC of intensities, same contrast) or "mind" (MIND-SSC SSD, any contrast)"""
    ncc_radius: int = 2
    """half-width of the local NCC window, voxels"""
    regularisation: float = 1.0
    """weight of the diffusion energy of the refinement displacement (mm per mm)"""
    smoothing_passes: int = 1
    """3x3x3 box filters of the velocity per iteration"""
    integration_steps: int = 4
    memory_mb: float = 4096.0
    """peak memory allowed for the optimisation; the grid is coarsened to fit"""

    def validate(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise InputError(f"refine_similarity must be one of {', '.join(SIMILARITIES)} (got {self.similarity!r}): "
                             "e.g. refine_similarity=ncc for same-contrast pairs, mind for multi-modal")
        if self.iterations < 0 or self.ncc_radius < 1 or self.integration_steps < 0 or self.smoothing_passes < 0:
            raise InputError("refine_iterations >= 0, refine_ncc_radius >= 1, refine_integration_steps >= 0 and "
                             "refine_smoothing_passes >= 0 are needed: e.g. 30, 2, 4, 1")
        if self.learning_rate <= 0 or self.regularisation < 0 or self.memory_mb <= 0:
            raise InputError("refine_learning_rate > 0, refine_regularisation >= 0 and refine_memory_mb > 0 are needed: "
                             "e.g. 0.5, 1, 4096")


def fine_spacing_for_budget(requested_mm: float, fixed_spacing: Sequence[float], fixed_size: Sequence[int],
                            memory_mb: float) -> float:
    """The refinement spacing (mm): ``requested_mm``, coarsened until the grid over the fixed image's
    box (``fixed_size`` voxels of ``fixed_spacing`` mm) fits ``memory_mb`` at BYTES_PER_VOXEL."""
    extent = [max(float(s) * (int(n) - 1), float(s)) for s, n in zip(fixed_spacing, fixed_size)]
    spacing = max(float(requested_mm), float(min(fixed_spacing)))
    budget_voxels = memory_mb * 2 ** 20 / BYTES_PER_VOXEL
    for _ in range(50):
        voxels = math.prod(max(1, round(e / max(spacing, s)) + 1) for e, s in zip(extent, fixed_spacing))
        if voxels <= budget_voxels:
            break
        spacing *= 1.1
    return spacing


@dataclass
class FixedWindows:
    """Box-window statistics of the fixed image, computed once per refinement (no gradient)."""

    image: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor

    @classmethod
    def of(cls, fixed: torch.Tensor, radius: int) -> "FixedWindows":
        with torch.no_grad():
            mean = box_mean(fixed, radius)
            return cls(fixed, mean, (box_mean(fixed * fixed, radius) - mean * mean).clamp_min(0))


def local_ncc(fixed: torch.Tensor | FixedWindows, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Local NCC map ``(1, 1, K, J, I)`` in [0, 1] (squared correlation, as ANTs' CC) over box windows
    of ``2 * radius + 1`` voxels; flat windows (both variances ~0) score 1, whatever the shift.
    ``fixed``: the image, or its :class:`FixedWindows` (made with the same ``radius``) to reuse."""
    windows = fixed if isinstance(fixed, FixedWindows) else FixedWindows.of(fixed, radius)
    # the three moving-dependent window sums in one (channel-batched) filter
    sums = box_mean(torch.cat([moving, moving * moving, windows.image * moving], dim=1), radius)
    mean_m = sums[:, 0:1]
    var_m = sums[:, 1:2] - mean_m * mean_m
    cov = sums[:, 2:3] - windows.mean * mean_m
    # (cov^2 + eps) / (var_f var_m + eps) <= 1 (Cauchy-Schwarz), = 1 for identical windows: identical
    # images sit at the maximum. With eps only below (cov^2 / (var var + eps)), raising the moving
    # window's contrast paid, and a brain registered to itself drifted by 0.07 voxel.
    return (cov * cov + NCC_EPSILON) / (windows.variance * var_m.clamp_min(0) + NCC_EPSILON)


def refine(fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor, settings: RefineSettings,
           spacing: Sequence[float], mask: torch.Tensor | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Refine ``initial`` (1, 3, K, J, I) voxels, fixed -> moving, on the grid of ``fixed``.

    ``fixed``/``moving``: images ``(1, 1, K, J, I)`` normalised to [0, 1] (``"ncc"``) or feature
    volumes ``(1, C, K, J, I)`` at unit total variance (``"mind"``), on one grid of ``spacing``
    (si, sj, sk) mm. ``mask``: where the similarity counts (dilated fixed foreground); None = all.
    Returns the refined displacement, same form as ``initial``.
    """
    settings.validate()
    if settings.iterations == 0:
        return initial
    start = initial.float()
    voxel_mm = (float(spacing[2]), float(spacing[1]), float(spacing[0]))  # (k, j, i)
    with torch.no_grad():
        warped = geometry.warp(moving.float(), start)  # moving pre-warped by ConvexAdam's field
        weight = None if mask is None else (mask > 0.5).float()
        windows = FixedWindows.of(fixed.float(), settings.ncc_radius) if settings.similarity == "ncc" else None
        cells = 3.0 * fixed[0, 0].numel()  # diffusion_penalty is a mean over channels and voxels
    velocity = torch.zeros_like(start).requires_grad_(True)
    optimiser = Adam(velocity, settings.learning_rate, eps=ADAM_EPSILON)

    def displacement_of(v: torch.Tensor) -> torch.Tensor:
        for _ in range(settings.smoothing_passes):
            v = box_mean(v, 1)
        return geometry.integrate_velocity(v, settings.integration_steps)

    for iteration in range(settings.iterations):
        optimiser.learning_rate = learning_rate_at(iteration, settings.iterations, settings.learning_rate)
        optimiser.zero_grad()
        field = displacement_of(velocity)
        moved = geometry.warp(warped, field)
        if settings.similarity == "ncc":
            similarity = local_ncc(windows, moved, settings.ncc_radius)
        else:
            similarity = -(moved - fixed).square().sum(dim=1, keepdim=True)
        data = -(similarity * weight).sum() if weight is not None else -similarity.sum()
        loss = data + settings.regularisation * cells * geometry.diffusion_penalty(field, voxel_mm)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress.update((iteration + 1) / settings.iterations)
    with torch.no_grad():
        field = displacement_of(velocity)
        total = geometry.compose(field, start)  # x + d(x) + u0(x + d(x))
    return total

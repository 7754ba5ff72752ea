"""ConvexAdam: coupled convex discrete search followed by Adam instance optimisation.

Siebert, Hansen, Heinrich, "Fast 3D registration with accurate optimisation and little learning
for Learn2Reg 2021" (MICCAI 2021 challenge) and "ConvexAdam: self-configuring dual-optimisation-based
3D multitask medical image registration" (IEEE TMI 2024). Written by hand here: no installed
library offers it.

Input: fixed and moving feature volumes ``(1, C, K, J, I)`` on one working grid (any features:
MIND-SSC, DINO, both). Output: a voxel displacement ``u`` ``(1, 3, K, J, I)`` on that grid in
working-grid voxels, channels as in ``geometry`` (channel c along tensor axis c + 2), such that
``moving(x + u(x))`` (``geometry.warp(moving, u)``) matches ``fixed(x)``: it maps FIXED voxels to
MOVING voxels.

Stage 1, convex search (no gradients): features are averaged over blocks of ``grid_spacing`` voxels,
one block per control point. For every control point and every candidate displacement of a
``(2 * search_radius + 1)^3`` window (candidates ``search_step`` voxels apart) the cost is the sum
over channels of squared feature differences (SSD), smoothed over neighbouring control points.
The cost volume is filled in chunks of candidates so temporary memory stays bounded. Two coupled
convex problems are then solved alternately with growing coupling weight: a point-wise argmin of
data cost plus ``weight * |d - smooth(d)|^2``, and a smoothing of the chosen field. Done for the
forward (fixed->moving) and backward (moving->fixed) problem, then both fields are made inverse
consistent (each is pushed towards minus the other, composed).

Stage 2, instance optimisation: the field is refined with Adam on a lattice of every
``adam_level``-th voxel (features averaged over the lattice cells). Each iteration smooths the
optimised field (``smoothing_passes`` 3x3x3 box filters), optionally integrates it as a stationary
velocity (scaling and squaring: diffeomorphic), warps the moving features and minimises the
feature SSD summed over the masked lattice cells + ``regularisation`` * the diffusion energy
(squared spatial gradient of the displacement, mm per mm) summed over all cells. Adam's learning
rate decays (cosine) so the last steps settle. The result is interpolated back to the working grid.
Field operations (warp, scaling and squaring, diffusion gradient) come from ``geometry/``.

All displacements inside this module are in working-grid voxels unless a name says otherwise.
Displacement channels, per-axis tuples and position columns are in (k, j, i) (tensor axis) order;
the exceptions are ``spacing`` arguments, (si, sj, sk) mm as ``Grid.spacing``, and the grid_sample
coordinates built in :func:`resample_lattice`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dinoreg.core import geometry
from dinoreg.core.filters import box_mean
from dinoreg.core.spatial import voxels_per_axis
from dinoreg.errors import InputError
from dinoreg.optim.adam import Adam
from dinoreg.progress import Progress

#: progress stage names reported by :func:`convex_adam`
STAGE_SEARCH = "convex search"
STAGE_ADAM = "instance optimisation"

Axes = tuple[int, int, int]  # per-axis integers in (k, j, i) order


@dataclass
class ConvexAdamSettings:
    """Parameters of :func:`convex_adam`. Voxel counts are working-grid voxels along the finest axis
    (scaled per axis on anisotropic grids, see :func:`per_axis`)."""

    grid_spacing: int = 4
    """control-point spacing of the convex search, voxels (a multiple of ``search_step``)"""
    search_radius: int = 4
    """candidate displacements on each side of zero per axis, in steps (capture range = radius * step voxels)"""
    search_step: int = 2
    """distance between candidate displacements, voxels"""
    coupling_weights: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    """coupling weights of the convex iterations (cost normalised to mean 1, displacement in steps)"""
    cost_smoothing_passes: int = 1
    """3x3x3 box filters applied to the cost of each candidate over neighbouring control points"""
    inverse_consistent: bool = True
    """also solve moving->fixed and make both search fields inverse consistent"""
    inverse_iterations: int = 15
    chunk_size: int = 64
    """candidate displacements per cost-volume chunk (bounds temporary memory)"""
    max_cost_volume_mb: float = 2048.0
    """refuse search settings whose cost volume would exceed this many MB"""
    adam_level: int = 2
    """the Adam field lives on every adam_level-th voxel (1 = full working resolution)"""
    adam_iterations: int = 40
    adam_learning_rate: float = 1.0
    """Adam step size, in lattice voxels"""
    regularisation: float = 0.5
    """weight of the diffusion regulariser (features are expected to have unit total variance)"""
    smoothing_passes: int = 1
    """3x3x3 box filters applied to the optimised field at every Adam iteration"""
    diffeomorphic: bool = False
    """optimise a stationary velocity field and integrate it (scaling and squaring)"""
    integration_steps: int = 4

    @staticmethod
    def from_params(params: dict[str, Any]) -> "ConvexAdamSettings":
        """Settings from a parameter dict; keys that are not settings are ignored."""
        names = {f.name for f in fields(ConvexAdamSettings)}
        chosen = {k: v for k, v in params.items() if k in names}
        if "coupling_weights" in chosen:
            weights = chosen["coupling_weights"]
            weights = weights.split(",") if isinstance(weights, str) else weights
            try:
                chosen["coupling_weights"] = tuple(float(w) for w in weights)
            except ValueError:
                raise InputError(f"coupling_weights must be numbers, got {weights!r}: e.g. 0.003,0.01,0.03,0.1,0.3,1") from None
        settings = ConvexAdamSettings(**chosen)
        settings.validate()
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Raise InputError naming the fix for values that cannot work."""
        positive = ["grid_spacing", "search_step", "chunk_size", "adam_level", "integration_steps"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1 (got {getattr(self, name)}): set {name}=1 or more")
        non_negative = ["search_radius", "cost_smoothing_passes", "inverse_iterations", "adam_iterations", "smoothing_passes"]
        for name in non_negative:
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0 (got {getattr(self, name)}): set {name}=0 or more")
        if self.grid_spacing % self.search_step:
            raise InputError(f"grid_spacing ({self.grid_spacing}) must be a multiple of search_step ({self.search_step}): "
                             f"e.g. grid_spacing={self.search_step * max(1, round(self.grid_spacing / self.search_step))}")
        if self.regularisation < 0 or self.adam_learning_rate <= 0:
            raise InputError("regularisation must be >= 0 and adam_learning_rate > 0: "
                             "e.g. regularisation=0.5, adam_learning_rate=1")
        if any(w < 0 for w in self.coupling_weights):
            raise InputError("coupling_weights must be >= 0: e.g. 0.003,0.01,0.03,0.1,0.3,1")


# ----------------------------------------------------------------------------------------------
# Lattices: the working grid, the search control grid and the Adam grid are all regular lattices
# of working voxels: lattice index m sits at working voxel position offset + step * m per axis.
# ----------------------------------------------------------------------------------------------

def block_mean(volume: torch.Tensor, block: Axes) -> torch.Tensor:
    """Average over non-overlapping blocks (k, j, i); a remainder at the far border is dropped.

    Block m covers voxels [block*m, block*(m+1)); its centre is at ``block*m + (block-1)/2``.
    """
    if tuple(block) == (1, 1, 1):
        return volume
    return F.avg_pool3d(volume, tuple(block), stride=tuple(block))


def block_centres(block: Axes) -> tuple[float, float, float]:
    """Working-voxel position of lattice index 0 of :func:`block_mean` per axis (k, j, i)."""
    return tuple((b - 1) / 2.0 for b in block)  # type: ignore[return-value]


def resample_lattice(field: torch.Tensor, src_step: Sequence[float], src_offset: Sequence[float],
                     dst_shape: Sequence[int], dst_step: Sequence[float], dst_offset: Sequence[float]) -> torch.Tensor:
    """Trilinear resampling of ``field (1, C, ...)`` from one lattice to another (values unchanged).

    Positions are in working voxels: source index m at ``src_offset + src_step * m`` per axis
    (k, j, i), likewise for the destination. Outside the source lattice the border value is kept.
    """
    src_shape = field.shape[2:]
    axes = []
    for n_src, n_dst, s_step, s_off, d_step, d_off in zip(src_shape, dst_shape, src_step, src_offset, dst_step, dst_offset):
        position = d_off + d_step * torch.arange(n_dst, dtype=torch.float32, device=field.device)
        index = (position - s_off) / s_step
        axes.append(2.0 * index / (n_src - 1) - 1.0 if n_src > 1 else torch.zeros_like(index))
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([i, j, k], dim=-1).unsqueeze(0)  # grid_sample's (x=I, y=J, z=K) positions
    return geometry.grid_sample_3d(field, grid.to(field.dtype), "bilinear", "border")


def _box3(volume: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` 3x3x3 mean filters; at the border only voxels inside are averaged."""
    for _ in range(passes):
        volume = box_mean(volume, 1)
    return volume


def _per_channel(per_axis: Sequence[float], device: torch.device) -> torch.Tensor:
    """A (k, j, i) per-axis tuple as a ``(1, 3, 1, 1, 1)`` tensor, one value per displacement channel."""
    return torch.tensor([float(x) for x in per_axis], dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)


#: cost added per squared candidate length (in steps; costs have mean 1), to break ties towards zero
TIE_BREAK = 1e-4

# ----------------------------------------------------------------------------------------------
# Stage 1: convex discrete search
# ----------------------------------------------------------------------------------------------

@dataclass
class SearchGeometry:
    """Per-axis (k, j, i) sizes of the convex search on a working grid of shape ``shape``."""

    shape: Axes
    grid_spacing: Axes
    step: Axes
    radius: int

    @property
    def control_shape(self) -> Axes:
        return tuple(n // g for n, g in zip(self.shape, self.grid_spacing))  # type: ignore[return-value]

    @property
    def candidates(self) -> torch.Tensor:
        """Candidate displacements ``(D, 3)`` in steps, columns (k, j, i), k slowest."""
        r = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k, j, i = torch.meshgrid(r, r, r, indexing="ij")
        return torch.stack([k.reshape(-1), j.reshape(-1), i.reshape(-1)], dim=1)


def search_geometry(shape: Sequence[int], settings: ConvexAdamSettings, spacing: Sequence[float] | None) -> SearchGeometry:
    """Per-axis search sizes for a working grid of ``shape`` (k, j, i) and ``spacing`` (si, sj, sk) mm."""
    step = voxels_per_axis(settings.search_step, spacing)
    ratio = settings.grid_spacing // settings.search_step
    # the grid spacing stays a multiple of the step on every axis (candidate blocks are slices)
    grid_spacing = tuple(s * ratio for s in step)
    shape_kji: Axes = (int(shape[0]), int(shape[1]), int(shape[2]))
    geometry = SearchGeometry(shape_kji, grid_spacing, step, int(settings.search_radius))  # type: ignore[arg-type]
    if any(n < g for n, g in zip(geometry.shape, geometry.grid_spacing)):
        raise InputError(f"the working grid {tuple(shape)} is smaller than one search block {grid_spacing}: "
                         "lower grid_spacing or working_spacing_mm")
    return geometry


def search_cost_volume(source: torch.Tensor, target: torch.Tensor, geometry: SearchGeometry,
                       chunk_size: int = 64, smoothing_passes: int = 1, progress: Progress | None = None,
                       progress_span: tuple[float, float] = (0.0, 1.0),
                       source_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cost of every candidate displacement at every control point: ``(D, Kc, Jc, Ic)``.

    ``cost[d, c] = sum_channels (source_block(c) - target_block(c + candidate_d))^2`` where blocks
    are ``grid_spacing`` wide feature means (``source`` = the image the field is defined on); each
    candidate's cost map is then smoothed over neighbouring control points, ``chunk_size`` candidates
    at a time (temporary memory: one candidate's ``channels * control points`` floats, plus the
    chunk's smoothing); the result does not depend on the chunk size. Costs are normalised to mean 1 over the
    control points that have data. Target blocks that leave the image see replicated border features.

    ``source_mask (1, 1, K, J, I)`` (on the source's grid, > 0.5 inside): each control point's cost
    is weighted by the fraction of its block inside the mask, so the field outside the mask is
    decided by the coupling (its neighbours inside), not by the image there. Finally
    :data:`TIE_BREAK` * |candidate|^2 (steps) is added: where every candidate costs the same (flat
    background, outside the mask) zero displacement wins, not the first candidate (a far corner).
    """
    g, s, r = geometry.grid_spacing, geometry.step, geometry.radius
    kc, jc, ic = geometry.control_shape
    channels = source.shape[1]
    device = source.device
    source_blocks = block_mean(source, g)[0, :, :kc, :jc, :ic]  # (C, Kc, Jc, Ic)
    # Target block means at every `step` voxel, padded so that every candidate block exists.
    pad = [r * x for x in s]
    padded = F.pad(target, (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]), mode="replicate")
    target_blocks = F.avg_pool3d(padded, tuple(g), stride=tuple(s))[0]  # (C, Kt, Jt, It)
    del padded
    ratio = [gg // ss for gg, ss in zip(g, s)]
    # Control point c and candidate a (in steps) read target block c * ratio + a + r per axis: for
    # one candidate that is a strided slice of target_blocks, so no gather is needed (a gather of
    # every (candidate, control point) row was 5x slower on CPU).
    candidates = geometry.candidates.to(device).long()
    count = candidates.shape[0]
    cost = torch.empty((count, kc, jc, ic), dtype=torch.float32, device=device)
    chunk_size = max(1, int(chunk_size))  # candidates smoothed at once
    start, end = progress_span
    for c0 in range(0, count, chunk_size):
        c1 = min(count, c0 + chunk_size)
        for d in range(c0, c1):
            ak, aj, ai = (int(a) + r for a in candidates[d])
            moved = target_blocks[:, ak:ak + ratio[0] * kc:ratio[0], aj:aj + ratio[1] * jc:ratio[1],
                                  ai:ai + ratio[2] * ic:ratio[2]]
            torch.sum(torch.sub(moved, source_blocks).square_(), 0, out=cost[d])
        cost[c0:c1] = _box3(cost[c0:c1].unsqueeze(0), smoothing_passes)[0]
        if progress is not None:
            progress.update(start + (end - start) * c1 / count)
    if source_mask is not None:
        weight = block_mean((source_mask > 0.5).float(), g)[0, 0, :kc, :jc, :ic]
        cost *= weight
        has_data = weight > 0
        mean = float(cost[:, has_data].mean()) if bool(has_data.any()) else 0.0
    else:
        mean = float(cost.mean())
    if mean > 0:
        cost /= mean
    cost += TIE_BREAK * candidates.float().square().sum(dim=1).view(-1, 1, 1, 1)
    return cost


def coupled_convex(cost: torch.Tensor, geometry: SearchGeometry, coupling_weights: Sequence[float],
                   points_per_chunk: int = 256) -> torch.Tensor:
    """Globally regularised choice of candidates: the control-point field ``(1, 3, Kc, Jc, Ic)``.

    Alternates a point-wise argmin of ``cost + weight * |d - smooth_field|^2`` (d in steps) and a
    3x3x3 smoothing of the chosen displacements, for each weight in ``coupling_weights``.
    Returned in working voxels (channels (dk, dj, di), as ``geometry``). Control points are taken
    ``points_per_chunk`` at a time: a (candidates x points) block that stays in the CPU cache
    (256 points ran 2.8x faster than 16384 on a 729-candidate search).
    """
    candidates = geometry.candidates.to(cost.device)  # (D, 3) steps, (k, j, i)
    count = cost.shape[0]
    shape = cost.shape[1:]
    flat_cost = cost.reshape(count, -1)
    candidate_norms = candidates.square().sum(dim=1, keepdim=True)  # (D, 1)

    def field_of(choice: torch.Tensor) -> torch.Tensor:
        chosen = candidates[choice]  # (P, 3) (k, j, i) steps
        return _box3(chosen.t().reshape(1, 3, *shape), 1)

    soft = field_of(flat_cost.argmin(dim=0))
    for weight in coupling_weights:
        soft_flat = soft.reshape(3, -1)
        choice = torch.empty(flat_cost.shape[1], dtype=torch.long, device=cost.device)
        for p0 in range(0, flat_cost.shape[1], points_per_chunk):
            p1 = min(flat_cost.shape[1], p0 + points_per_chunk)
            # cost + w |c - t|^2 = cost + w |c|^2 - 2 w c.t + (w |t|^2, the same for every candidate)
            coupled = torch.addmm(flat_cost[:, p0:p1] + weight * candidate_norms, candidates, soft_flat[:, p0:p1],
                                  alpha=-2.0 * weight)
            choice[p0:p1] = coupled.argmin(dim=0)
        soft = field_of(choice)
    return soft * torch.tensor(geometry.step, dtype=torch.float32, device=cost.device).view(1, 3, 1, 1, 1)


def make_inverse_consistent(forward: torch.Tensor, backward: torch.Tensor,
                            iterations: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise a forward and a backward voxel displacement on one lattice (ConvexAdam's scheme).

    Each iteration sets ``f <- (f - b o (id + f)) / 2`` and ``b <- (b - f o (id + b)) / 2`` so that
    composing them approaches the identity. Fields ``(1, 3, ...)`` in voxels of that lattice.
    """
    for _ in range(iterations):
        f_old, b_old = forward, backward
        forward = 0.5 * (f_old - geometry.warp(b_old, f_old))
        backward = 0.5 * (b_old - geometry.warp(f_old, b_old))
    return forward, backward


def convex_search(fixed: torch.Tensor, moving: torch.Tensor, settings: ConvexAdamSettings,
                  spacing: Sequence[float] | None = None, progress: Progress | None = None,
                  mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 on its own: voxel displacement ``(1, 3, K, J, I)`` on the working grid.

    ``mask`` / ``moving_mask``: where the fixed / moving image's content drives the forward /
    backward search (see :func:`search_cost_volume`); None = everywhere.
    """
    field, geometry = _convex_search_control(fixed, moving, settings, spacing, progress, mask, moving_mask)
    return control_to_grid(field, geometry)


def control_to_grid(field: torch.Tensor, geometry: SearchGeometry) -> torch.Tensor:
    """Interpolate a control-point field to every voxel of the working grid (values unchanged)."""
    return resample_lattice(field, geometry.grid_spacing, block_centres(geometry.grid_spacing), geometry.shape,
                            (1, 1, 1), (0, 0, 0))


def _convex_search_control(fixed: torch.Tensor, moving: torch.Tensor, settings: ConvexAdamSettings,
                           spacing: Sequence[float] | None, progress: Progress | None,
                           mask: torch.Tensor | None = None,
                           moving_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SearchGeometry]:
    geometry = search_geometry(fixed.shape[2:], settings, spacing)
    count = (2 * geometry.radius + 1) ** 3
    megabytes = count * torch.Size(geometry.control_shape).numel() * 4 / 2 ** 20
    if megabytes > settings.max_cost_volume_mb:
        raise InputError(f"the search cost volume would take {megabytes:.0f} MB: raise grid_spacing, lower search_radius "
                         f"or raise max_cost_volume_mb (now {settings.max_cost_volume_mb:.0f})")
    directions = 2 if settings.inverse_consistent else 1
    with torch.no_grad():
        cost = search_cost_volume(fixed, moving, geometry, settings.chunk_size, settings.cost_smoothing_passes,
                                  progress, (0.0, 0.9 if directions == 1 else 0.45), mask)
        forward = coupled_convex(cost, geometry, settings.coupling_weights)
        del cost
        if not settings.inverse_consistent:
            return forward, geometry
        cost = search_cost_volume(moving, fixed, geometry, settings.chunk_size, settings.cost_smoothing_passes,
                                  progress, (0.45, 0.9), moving_mask)
        backward = coupled_convex(cost, geometry, settings.coupling_weights)
        del cost
        to_control = _per_channel(geometry.grid_spacing, fixed.device)
        forward, _ = make_inverse_consistent(forward / to_control, backward / to_control, settings.inverse_iterations)
        if progress is not None:
            progress.update(1.0)
        return forward * to_control, geometry


# ----------------------------------------------------------------------------------------------
# Stage 2: Adam instance optimisation
# ----------------------------------------------------------------------------------------------

def diffusion_sum_gradient(displacement: torch.Tensor, voxel_mm: Sequence[float]) -> torch.Tensor:
    """Gradient of the diffusion energy SUMMED over lattice cells (mm per mm, dimensionless).

    ``displacement (1, 3, K, J, I)`` in lattice voxels of ``voxel_mm`` (k, j, i). A sum over cells,
    like the data term of :func:`instance_optimisation` (a sum over the masked cells), so their ratio,
    hence the effective regularisation, does not depend on how much background the field of view
    holds. From ``geometry.diffusion_gradient`` (a mean over the 3 channels and the cells): times
    3 x cells (exact up to the (n-1)/n of each axis).
    """
    mean_gradient = geometry.diffusion_gradient(displacement, voxel_mm)
    cells = displacement[0, 0].numel()
    return mean_gradient * (3.0 * cells)


#: Adam's epsilon in the units of the summed loss's gradient (per lattice cell: twice the feature
#: residual times the feature gradient, features at unit total variance). Gradients well below it,
#: such as float rounding at an exact optimum, give proportionally small steps instead of Adam's
#: normalised full steps: without it, identical images dithered by about a lattice voxel.
ADAM_EPSILON = 0.1
#: the learning rate decays (cosine) from ``adam_learning_rate`` to this fraction of it, so the
#: last iterations settle instead of oscillating around the optimum with full-size steps
FINAL_LEARNING_RATE_FRACTION = 0.05


def learning_rate_at(iteration: int, iterations: int, learning_rate: float) -> float:
    """Cosine decay from ``learning_rate`` (iteration 0) to FINAL_LEARNING_RATE_FRACTION of it (last)."""
    progress = iteration / max(1, iterations - 1)
    floor = FINAL_LEARNING_RATE_FRACTION
    return learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def instance_optimisation(fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor, settings: ConvexAdamSettings,
                          spacing: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                          progress: Progress | None = None) -> torch.Tensor:
    """Stage 2 on its own: refine ``initial (1, 3, K, J, I)`` (voxels) with Adam; returns the same form.

    Minimises ``sum over masked cells of the feature SSD + regularisation * diffusion energy``
    (both sums over lattice cells, see :func:`diffusion_sum_gradient`). ``mask (1, 1, K, J, I)``
    restricts the data term to the lattice cells that touch it (e.g. the dilated fixed
    foreground), which also saves time; the regulariser acts everywhere.
    """
    shape = tuple(fixed.shape[2:])
    level = voxels_per_axis(settings.adam_level, spacing)
    level = tuple(min(l, n) for l, n in zip(level, shape))  # type: ignore[assignment]
    offset = block_centres(level)  # type: ignore[arg-type]
    spacing_kji = (1.0, 1.0, 1.0) if spacing is None else (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    voxel_mm = tuple(l * s for l, s in zip(level, spacing_kji))
    device = fixed.device
    with torch.no_grad():
        fixed_lattice = block_mean(fixed.float(), level)  # type: ignore[arg-type]
        moving_lattice = block_mean(moving.float(), level)  # type: ignore[arg-type]
        lattice_shape = tuple(fixed_lattice.shape[2:])
        to_lattice = _per_channel(level, device)  # type: ignore[arg-type]
        start = resample_lattice(initial.float(), (1, 1, 1), (0, 0, 0), lattice_shape, level, offset) / to_lattice
        channels = fixed_lattice.shape[1]
        if mask is not None:
            inside = block_mean((mask > 0.5).float(), level).reshape(-1) > 0  # type: ignore[arg-type]
            points = torch.nonzero(inside).squeeze(1)
        else:
            points = torch.arange(fixed_lattice[0, 0].numel(), device=device)
        fixed_points = fixed_lattice.reshape(channels, -1)[:, points].t()  # (N, C)
        moving_table = channels_last_table(moving_lattice)
        base = _lattice_index(lattice_shape, device).reshape(-1, 3)[points]  # (N, 3) lattice voxels (k, j, i)
    if settings.adam_iterations == 0 or points.numel() == 0:
        return initial
    parameter = start.clone().requires_grad_(True)
    optimiser = Adam(parameter, settings.adam_learning_rate, eps=ADAM_EPSILON)

    def field_of(param: torch.Tensor) -> torch.Tensor:
        smooth = _box3(param, settings.smoothing_passes)
        if settings.diffeomorphic:
            return geometry.integrate_velocity(smooth, settings.integration_steps)
        return smooth

    for iteration in range(settings.adam_iterations):
        optimiser.learning_rate = learning_rate_at(iteration, settings.adam_iterations, settings.adam_learning_rate)
        optimiser.zero_grad()
        displacement = field_of(parameter)
        # data term by autograd up to the displacement; the regulariser's gradient is added directly
        current = displacement.detach().requires_grad_(True)
        moved = current.reshape(3, -1).t().index_select(0, points)  # (N, 3) lattice voxels (k, j, i)
        sampled = sample_table(moving_table, lattice_shape, base + moved)  # type: ignore[arg-type]
        data = F.mse_loss(sampled, fixed_points, reduction="sum")
        data.backward()
        gradient = current.grad
        if settings.regularisation > 0:
            gradient = gradient.add_(diffusion_sum_gradient(current.detach(), voxel_mm), alpha=settings.regularisation)
        # a scalar whose gradient is ``gradient``: tensor.backward(gradient) would import torch.fx's
        # symbolic shapes and sympy (about 0.35 s per process)
        (displacement * gradient).sum().backward()
        optimiser.step()
        if progress is not None:
            progress.update((iteration + 1) / settings.adam_iterations)
    with torch.no_grad():
        lattice_field = field_of(parameter) * to_lattice
        return resample_lattice(lattice_field, level, offset, shape, (1, 1, 1), (0, 0, 0))


def channels_last_table(volume: torch.Tensor) -> torch.Tensor:
    """``(1, C, K, J, I)`` -> ``(K * J * I, C)``: one row of C values per voxel, for :func:`sample_table`."""
    return volume[0].permute(1, 2, 3, 0).reshape(-1, volume.shape[1]).contiguous()


def sample_table(table: torch.Tensor, shape: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
    """Trilinear values ``(N, C)`` of a channels-last volume at ``positions (N, 3)``, voxels, columns (k, j, i).

    Same values as ``F.grid_sample(..., align_corners=True, padding_mode="border")`` (positions
    clamped to the volume, zero gradient outside), differentiable with respect to ``positions``
    only. Written by hand because CPU ``grid_sample`` gathers the corners of each channel plane
    separately: one gather of the 8 corner rows of C values, then a weighted sum, is about twice
    as fast forward + backward for the 12 MIND channels of the Adam data term (measured on the
    real brain pairs' lattice: 70 vs 140 ms per iteration, 2 threads).
    """
    depth, height, width = (int(n) for n in shape)
    upper = positions.new_tensor([depth - 1, height - 1, width - 1])
    clamped = torch.minimum(torch.clamp(positions, min=0.0), upper)
    low = torch.minimum(clamped.detach().floor(), torch.clamp(upper - 1.0, min=0.0))  # low + 1 stays inside
    fraction = clamped - low
    low_index = low.to(torch.int64)
    first = (low_index[:, 0] * height + low_index[:, 1]) * width + low_index[:, 2]
    step_i, step_j, step_k = int(width > 1), width * int(height > 1), width * height * int(depth > 1)
    offsets = torch.tensor([a * step_k + b * step_j + c * step_i for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                           dtype=torch.int64, device=positions.device)
    corners = table[first.unsqueeze(1) + offsets]  # (N, 8, C), corner order (k, j, i) as the offsets
    fk, fj, fi = fraction.unbind(1)
    wk, wj, wi = (torch.stack([1.0 - f, f], dim=1) for f in (fk, fj, fi))
    weights = (wk[:, :, None, None] * wj[:, None, :, None] * wi[:, None, None, :]).reshape(-1, 1, 8)
    return torch.bmm(weights, corners).squeeze(1)


def _lattice_index(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Voxel index of every lattice cell, ``(K, J, I, 3)``, last axis (k, j, i), float32."""
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in shape), indexing="ij")
    return torch.stack([k, j, i], dim=-1)


def convex_adam(fixed: torch.Tensor, moving: torch.Tensor, settings: ConvexAdamSettings | None = None,
                spacing: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                progress: Progress | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Register feature volumes: returns the voxel displacement ``(1, 3, K, J, I)`` (channels as in ``geometry``).

    Args:
        fixed, moving: ``(1, C, K, J, I)`` float features on the same working grid and device.
            Best scaled to unit total variance (sum over channels of the variances = 1), which the
            default ``regularisation`` assumes.
        settings: parameters (defaults when None).
        spacing: working grid spacing (si, sj, sk) in mm, for anisotropic grids; None = isotropic.
        mask: optional ``(1, 1, K, J, I)`` region of the fixed grid where the data terms of the
            search and of the Adam stage are evaluated (dilated foreground); None = everywhere.
        moving_mask: the same for the moving image (the backward search of ``inverse_consistent``).
        progress: reports the stages :data:`STAGE_SEARCH` and :data:`STAGE_ADAM` and checks cancel.

    The field maps fixed voxels to moving voxels: ``moving`` resampled at ``x + u(x)``
    (``geometry.warp(moving, u)``) matches ``fixed``.
    """
    settings = settings or ConvexAdamSettings()
    settings.validate()
    if fixed.dim() != 5 or fixed.shape != moving.shape or fixed.shape[0] != 1:
        raise InputError(f"fixed and moving features must both be (1, C, K, J, I) of one shape, got "
                         f"{tuple(fixed.shape)} and {tuple(moving.shape)}: resample them onto one working grid")
    fixed, moving = fixed.float(), moving.float()
    if progress is not None:
        progress.stage(STAGE_SEARCH)
    if settings.search_radius > 0:
        control, geometry = _convex_search_control(fixed, moving, settings, spacing, progress, mask, moving_mask)
        displacement = control_to_grid(control, geometry)
    else:
        displacement = fixed.new_zeros((1, 3, *fixed.shape[2:]))
    if progress is not None:
        progress.stage(STAGE_ADAM)
    return instance_optimisation(fixed, moving, displacement, settings, spacing, mask, progress)

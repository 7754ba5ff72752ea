"""Zero-shot deformable registration: features (MIND-SSC, DINO or both) + ConvexAdam.

No learnable parameters are trained here: the features are handcrafted (MIND) or come from a
frozen foundation model (DINOv2/DINOv3 slice-wise, see ``features/dino``), and the displacement is
optimised for each pair (DINO-Reg, ConvexAdam). Three methods are registered:

- ``mind-zeroshot``: MIND-SSC features, always available;
- ``dino-zeroshot``: DINO features (needs model weights installed);
- ``dino-mind``: both, each feature group scaled to a fixed share of the total variance.

Every method works on a working grid over the fixed image (``working_spacing_mm``), with the moving
image pre-aligned by the affine stage, and returns ``Transform([dense field, *initial])``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from dinoreg.core import geometry
from dinoreg.core.filters import box_mean
from dinoreg.core.transforms import Transform
from dinoreg.errors import InputError
from dinoreg.features.dino import dino_feature_pair
from dinoreg.core.intensity import robust_normalise
from dinoreg.features.dino.params import DEFAULT_PARAMS as DINO_DEFAULTS
from dinoreg.features.mind import mind_ssc
from dinoreg.core.volume import Grid
from dinoreg.methods.base import (Availability, Method, RegistrationProblem, WorkingPair, dense_result, fixed_on_grid,
                                  moving_on_grid, register_method, working_grid)
from dinoreg.optim.convex_adam import STAGE_ADAM, STAGE_SEARCH, ConvexAdamSettings, convex_adam, make_inverse_consistent
from dinoreg.optim.refine import STAGE_REFINE, RefineSettings, fine_spacing_for_budget, refine

STAGE_RESAMPLE = "resampling"
STAGE_FEATURES = "features"
STAGE_OUTPUT = "output field"
#: planned only (never started): the reverse direction's search, Adam and refinement under ``inverse_consistent``
STAGE_REVERSE = "reverse direction"

# Every parameter shared by the three methods. Defaults were tuned for speed and accuracy on a
# 2-core CPU with inter-subject brain MR pairs (T1-like images synthesised from SynthSeg label
# maps, affine pre-aligned): 160x192x224 in ~10-20 s, ~1.3 GB, mean Dice 0.736 on 32 structures
# vs 0.722 for ANTs SyN and 0.577 affine only (before issue 17's refinement; see BENCHMARKS.md).
COMMON_DEFAULTS: dict[str, Any] = {
    # working grid and intensities
    "working_spacing_mm": 1.6,          # grid the features and fields live on (mm; never finer than the fixed image);
                                        # 1.5 gave +0.001 Dice on the real pairs for 20 % more time
    "intensity_low_percent": 0.5,       # robust clip of the foreground intensities to [0, 1] (percent)
    "intensity_high_percent": 99.5,
    "foreground_margin_mm": 8.0,        # the Adam data term is evaluated on the fixed foreground dilated by this (mm)
    # convex search (voxels of the working grid)
    "grid_spacing": 4,                  # control-point spacing (a multiple of search_step)
    "search_radius": 4,                 # candidates per side and axis, in steps: capture range radius * step voxels
    "search_step": 2,                   # spacing of the candidate displacements
    "cost_smoothing_passes": 1,
    "inverse_consistent": False,        # both directions (search, Adam, refinement), then symmetrised: registering
                                        # the pair the other way gives the inverse transform; ~2x those stages' time
    # Adam instance optimisation
    "adam_level": 2,                    # the optimised field lives on every 2nd working voxel
    "adam_iterations": 20,              # with the decaying step, 30 or 40 gave the same Dice and smoothness on real brains
    "adam_learning_rate": 1.0,
    "regularisation": 1.0,              # diffusion weight per lattice cell (features have unit total variance);
                                        # 1.0 (was 0.25) with refine_regularisation 0.5 (was 1.0): a smoother coarse
                                        # field that the refinement details. Issue 17, whole process: Dice
                                        # 0.669 / 0.654 on the real pair (was 0.663 / 0.651), 0.794 over 6 synthetic
                                        # pairs (was 0.788), SDlogJ 0.200 / 0.217 (was 0.224 / 0.244)
    "smoothing_passes": 1,              # 3x3x3 box filters of the field per iteration
    "diffeomorphic": True,              # stationary velocity + scaling and squaring: no folding
    "integration_steps": 2,             # 3 or 4 gave the same Dice (+0.0003), SDlogJ and no folding on real brains
    # fine refinement (optim/refine.py): a diffeomorphic Adam stage on a finer grid after ConvexAdam
    "refine_spacing_mm": 2.4,           # grid of the refinement (mm, never finer than the fixed image); 0 = off.
                                        # 2.4 mm, 10 iterations: +0.013/+0.015 Dice on the two real directions for
                                        # ~6-9 CPU s (issue 17; see BENCHMARKS.md)
    "refine_iterations": 10,
    "refine_learning_rate": 0.5,        # Adam step, voxels of the refinement grid
    "refine_similarity": "ncc",         # "ncc" (local NCC, same contrast) or "mind" (MIND-SSC SSD, any contrast)
    "refine_ncc_radius": 2,             # local NCC window half-width, voxels
    "refine_regularisation": 0.5,       # diffusion weight per voxel (mm per mm); see "regularisation"
    "refine_smoothing_passes": 1,
    "refine_integration_steps": 2,
    "refine_memory_mb": 4096.0,         # the refinement grid is coarsened until its optimisation fits this
}

MIND_DEFAULTS: dict[str, Any] = {
    "mind_radius": 1,      # patch radius of MIND-SSC (voxels of the working grid)
    "mind_dilation": 2,    # neighbour distance of MIND-SSC (voxels of the working grid)
}

STAGE_DINO = "dino features"  # reported by features/dino itself
STAGE_WEIGHTS = {STAGE_RESAMPLE: 1.0, STAGE_FEATURES: 2.0, STAGE_SEARCH: 4.0, STAGE_ADAM: 10.0, STAGE_REFINE: 10.0,
                 STAGE_OUTPUT: 1.0}
DINO_STAGE_WEIGHTS = {**STAGE_WEIGHTS, STAGE_DINO: 20.0}

# Presets overlay the defaults. 'brain-mr' is the tuned default itself (the defaults were tuned on brain MR).
BRAIN_MR: dict[str, Any] = {}
# 'accurate': the default's ConvexAdam, then the refinement on a 1.4 mm grid (12 iterations, 2 squarings).
# Issue 17: the earlier version (1 mm working grid, 1 mm refinement, 30 iterations, 4 squarings) ran over
# 9 CPU minutes per 1 mm brain pair; one 1 mm refinement iteration costs ~9 CPU s (grid_sample backward
# of every squaring, then the box filters), one at 1.4 mm ~2.9 s. 1.4 mm x 12 gave +0.004/+0.009 Dice
# over the default on the two real directions and +0.013 on the 6 synthetic pairs (BENCHMARKS.md).
# With the defaults' smoother ConvexAdam (regularisation 1.0, refinement 0.5): 0.666 / 0.662 on the real pair
# (0.667 / 0.659 with the earlier 0.25 / 1.0), +0.0065 on the 6 synthetic pairs (6 of 6 higher), SDlogJ
# 0.200 / 0.217, below FireANTs' 0.206 / 0.316 (issue 17's smoothness target; the sweep is in BENCHMARKS.md).
ACCURATE: dict[str, Any] = {"refine_spacing_mm": 1.4, "refine_iterations": 12, "refine_integration_steps": 2}
BODY_CT: dict[str, Any] = {"working_spacing_mm": 2.0, "search_radius": 5, "regularisation": 0.5, "refine_spacing_mm": 0.0}
#: body CT with DINO features: DINO-Reg's soft-tissue window (level 50, width 400 HU)
BODY_CT_DINO: dict[str, Any] = {**BODY_CT, "ct_window": "-150,250"}
# 'fast' has no refinement: it keeps the ConvexAdam regularisation that was tuned without one (0.25)
FAST: dict[str, Any] = {"working_spacing_mm": 2.0, "search_radius": 3, "inverse_consistent": False, "adam_iterations": 20,
                        "regularisation": 0.25,
                        "refine_spacing_mm": 0.0}


def _presets(defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    body_ct = BODY_CT_DINO if "ct_window" in defaults else BODY_CT
    return {"default": dict(defaults), "brain-mr": dict(BRAIN_MR), "body-ct": dict(body_ct), "fast": dict(FAST),
            "accurate": dict(ACCURATE)}


@dataclass
class ImageOnGrid:
    """One image of the pair on a working grid, as the zero-shot pipeline uses it (tensors ``(1, C, K, J, I)``)."""

    image: torch.Tensor
    """intensities as resampled (C = 1)"""
    mask: torch.Tensor | None
    """the user's mask resampled, float {0, 1}, or None"""
    normalised: torch.Tensor
    """intensities robustly normalised to [0, 1] (:func:`robust_normalise`)"""
    region: torch.Tensor
    """where its data term counts: the mask, or the voxels above the image minimum, dilated by ``foreground_margin_mm``"""
    mind: torch.Tensor | None = None
    """MIND-SSC of ``normalised`` (C = 12), when asked for"""

    @classmethod
    def of(cls, image: torch.Tensor, mask: torch.Tensor | None, grid: Grid, params: dict[str, Any],
           normalise_in_mask: bool) -> "ImageOnGrid":
        """``normalise_in_mask``: percentiles over the mask (only when BOTH images have one, see
        :func:`both_masked`), else over the voxels above the image minimum. No MIND yet (:meth:`with_mind`)."""
        low, high = float(params["intensity_low_percent"]), float(params["intensity_high_percent"])
        normalised = robust_normalise(image, mask if normalise_in_mask else None, low, high)
        region = foreground_region(image, mask, grid.spacing, float(params["foreground_margin_mm"]))
        return cls(image, mask, normalised, region)

    def with_mind(self, grid: Grid, params: dict[str, Any]) -> "ImageOnGrid":
        """Itself, with :attr:`mind` computed if it was not yet (``grid``: the grid it is on)."""
        if self.mind is None:
            self.mind = mind_ssc(self.normalised, self.mask, int(params["mind_radius"]), int(params["mind_dilation"]),
                                 grid.spacing)
        return self


class ZeroShotMethod(Method):
    """Shared pipeline of the zero-shot methods; subclasses say which features to compute."""

    kind = "zero-shot"
    stage_weights = STAGE_WEIGHTS
    #: the features include MIND-SSC, computed per image (so the fixed image's can be prepared)
    mind_features = False

    def features(self, pair: WorkingPair, fixed: ImageOnGrid, moving: ImageOnGrid, params: dict[str, Any],
                 problem: RegistrationProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature volumes ``(1, C, K, J, I)`` of the two images on ``pair``'s grid, each group at unit total variance."""
        raise NotImplementedError

    def prepare(self, problem: RegistrationProblem) -> None:
        """The fixed image on the working grid and, when the refinement runs, on its grid: resampled,
        normalised, its region and (for MIND features) its MIND-SSC. None of it needs the affine transform."""
        params = self.parameters(overrides=problem.params)
        grids = [(working_spacing(params), self.mind_features)]
        fine_spacing = refine_spacing(problem, params)
        if fine_spacing is not None:
            grids.append((fine_spacing, str(params["refine_similarity"]) == "mind"))
        with torch.no_grad():
            for spacing_mm, with_mind in grids:
                grid = working_grid(problem.fixed.grid, spacing_mm)
                fixed = fixed_image_on_grid(problem, params, grid)
                problem.prepared[("fixed on grid", spacing_mm)] = fixed.with_mind(grid, params) if with_mind else fixed

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        """Both directions when ``inverse_consistent`` (see :meth:`symmetrised`), else fixed -> moving only."""
        params = self.parameters(overrides=problem.params)
        progress = problem.progress
        settings = ConvexAdamSettings.from_params(params)
        both_ways = settings.inverse_consistent
        if both_ways:  # the whole dense pipeline is symmetrised below: the search needs no symmetrisation of its own
            settings = dataclasses.replace(settings, inverse_consistent=False)
            progress.plan({**progress.weights, STAGE_REVERSE: sum(progress.weights.get(name, 0.0)
                                                                  for name in (STAGE_SEARCH, STAGE_ADAM, STAGE_REFINE))})
        spacing_mm = working_spacing(params)
        progress.stage(STAGE_RESAMPLE)
        with torch.no_grad():
            pair, fixed, moving = pair_on_grid(problem, initial, params, spacing_mm)
            progress.stage(STAGE_FEATURES)
            if self.mind_features:
                fixed, moving = fixed.with_mind(pair.grid, params), moving.with_mind(pair.grid, params)
            fixed_features, moving_features = self.features(pair, fixed, moving, params, problem)
            foreground, moving_foreground = fixed.region, moving.region
            del fixed, moving
        fields = [convex_adam(fixed_features, moving_features, settings, spacing=pair.grid.spacing, mask=foreground,
                              progress=progress, moving_mask=moving_foreground)]
        if both_ways:  # moving -> fixed on the same working grid: the roles of the two images swapped
            fields.append(convex_adam(moving_features, fixed_features, settings, spacing=pair.grid.spacing,
                                      mask=moving_foreground, progress=progress, moving_mask=foreground))
        del fixed_features, moving_features
        fields, pair = self.refine_stage(problem, initial, params, fields, pair)
        displacement = self.symmetrised(*fields, settings.inverse_iterations) if both_ways else fields[0]
        progress.stage(STAGE_OUTPUT)
        return dense_result(displacement, pair, problem, initial)

    @staticmethod
    def symmetrised(forward: torch.Tensor, backward: torch.Tensor, iterations: int) -> torch.Tensor:
        """The inverse-consistent field from the two directions' fields ``(1, 3, K, J, I)`` (voxels of one grid:
        the fixed image's working grid, moving pre-aligned): ConvexAdam's symmetrisation, ``f <- (f - b o (id + f))
        / 2`` and the same for ``b``, repeated. Swapping the images swaps ``f`` and ``b``, so the reverse
        registration returns (to within the symmetrisation's residual) the inverse of this one."""
        with torch.no_grad():
            return make_inverse_consistent(forward, backward, iterations)[0]

    def refine_stage(self, problem: RegistrationProblem, initial: Transform, params: dict[str, Any],
                     fields: list[torch.Tensor], pair: WorkingPair) -> tuple[list[torch.Tensor], WorkingPair]:
        """The fine refinement (``optim/refine.py``) of ``fields`` (fixed -> moving, then, if given, moving ->
        fixed: the roles of the images swapped) on the grid of :func:`refine_spacing`; without one, the inputs."""
        spacing_mm = refine_spacing(problem, params)
        if spacing_mm is None:
            return fields, pair
        settings = refine_settings(params)
        problem.progress.stage(STAGE_REFINE)
        with torch.no_grad():
            fine, fixed, moving = pair_on_grid(problem, initial, params, spacing_mm)
            if settings.similarity == "mind":
                fixed, moving = fixed.with_mind(fine.grid, params), moving.with_mind(fine.grid, params)
                fixed_input, moving_input = normalise_group(fixed.mind, moving.mind, fixed.region)
            else:
                fixed_input, moving_input = fixed.normalised, moving.normalised
            # the working grid and the fine grid cover the same box with the same corner voxels
            starts = [geometry.resize_field(field, fine.fixed.shape[2:]) for field in fields]
        refined = [refine(fixed_input, moving_input, starts[0], settings, fine.grid.spacing, fixed.region,
                          problem.progress).detach()]
        if len(starts) == 2:
            problem.progress.stage(STAGE_REFINE)
            refined.append(refine(moving_input, fixed_input, starts[1], settings, fine.grid.spacing, moving.region,
                                  problem.progress).detach())
        return refined, fine


def working_spacing(params: dict[str, Any]) -> float:
    """``working_spacing_mm`` (checked: >= 0; 0 = the fixed image's own spacing)."""
    spacing_mm = float(params["working_spacing_mm"])
    if spacing_mm < 0:
        raise InputError(f"working_spacing_mm must be >= 0 (got {spacing_mm}): e.g. working_spacing_mm=2")
    return spacing_mm


def refine_settings(params: dict[str, Any]) -> RefineSettings:
    """The refinement's settings from the method's parameters (checked)."""
    settings = RefineSettings(
        iterations=int(params["refine_iterations"]), learning_rate=float(params["refine_learning_rate"]),
        similarity=str(params["refine_similarity"]), ncc_radius=int(params["refine_ncc_radius"]),
        regularisation=float(params["refine_regularisation"]),
        smoothing_passes=int(params["refine_smoothing_passes"]),
        integration_steps=int(params["refine_integration_steps"]), memory_mb=float(params["refine_memory_mb"]))
    settings.validate()
    return settings


def refine_spacing(problem: RegistrationProblem, params: dict[str, Any]) -> float | None:
    """The refinement grid's spacing (mm): ``refine_spacing_mm``, coarsened to fit ``refine_memory_mb``; None
    when the refinement is off or would not be finer than ConvexAdam's Adam lattice (every ``adam_level``-th
    voxel of the working grid), where it adds nothing."""
    settings = refine_settings(params)
    requested = float(params["refine_spacing_mm"])
    if requested <= 0 or settings.iterations == 0:
        return None
    fixed_grid = problem.fixed.grid
    spacing_mm = fine_spacing_for_budget(requested, fixed_grid.spacing, fixed_grid.size, settings.memory_mb)
    lattice_mm = float(min(working_grid(fixed_grid, working_spacing(params)).spacing)) * int(params["adam_level"])
    return None if spacing_mm >= 0.99 * lattice_mm else spacing_mm


def fixed_image_on_grid(problem: RegistrationProblem, params: dict[str, Any], grid: Grid) -> ImageOnGrid:
    """The fixed image as :class:`ImageOnGrid` on ``grid`` (no transform needed: see ``ZeroShotMethod.prepare``)."""
    image, mask = fixed_on_grid(problem, grid)
    return ImageOnGrid.of(image, mask, grid, params, both_masked(problem))


def pair_on_grid(problem: RegistrationProblem, initial: Transform, params: dict[str, Any],
                 spacing_mm: float) -> tuple[WorkingPair, ImageOnGrid, ImageOnGrid]:
    """Fixed and pre-aligned moving on the grid of ``spacing_mm`` (:func:`working_grid`): the raw pair and each
    image as :class:`ImageOnGrid`. The fixed one is taken from ``problem.prepared`` when prepared there."""
    grid = working_grid(problem.fixed.grid, spacing_mm)
    fixed = problem.prepared.pop(("fixed on grid", spacing_mm), None)
    if fixed is None:
        fixed = fixed_image_on_grid(problem, params, grid)
    image, mask = moving_on_grid(problem, initial, grid)
    moving = ImageOnGrid.of(image, mask, grid, params, both_masked(problem))
    pair = WorkingPair(grid=grid, fixed=fixed.image, moving=moving.image, fixed_mask=fixed.mask, moving_mask=moving.mask)
    return pair, fixed, moving


def both_masked(problem: RegistrationProblem) -> bool:
    """The normalisation rule, ONE for both images: each is normalised within its mask when both images
    have one; otherwise neither is (each image's voxels above its minimum): a mask on one image only
    would clip that image inside its mask and the other over its whole foreground, so the same tissue
    would get different grey values."""
    return problem.fixed_mask is not None and problem.moving_mask is not None


def foreground_region(fixed: torch.Tensor, fixed_mask: torch.Tensor | None, spacing: Any, margin_mm: float) -> torch.Tensor:
    """Where the data term is evaluated: the fixed mask (or every voxel above the image minimum),
    dilated by ``margin_mm`` (a box of that half-width per axis). ``(1, 1, K, J, I)`` float {0, 1}."""
    region = (fixed_mask > 0.5) if fixed_mask is not None else (fixed > fixed.min())
    region = region.float()
    if margin_mm > 0:
        si, sj, sk = (float(s) for s in spacing)
        radius = [max(0, int(round(margin_mm / s))) for s in (sk, sj, si)]
        # box dilation: a window touches the region iff its mean is > 0 (3x faster than max_pool3d on the CPU)
        region = (box_mean(region, radius) > 0).float()
    if not bool(region.any()):
        region = torch.ones_like(region)
    return region


def normalise_group(fixed: torch.Tensor, moving: torch.Tensor, region: torch.Tensor | None,
                    total_variance: float = 1.0, max_samples: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale a fixed/moving feature group jointly, IN PLACE, so that the sum of its channel
    variances (estimated over ``region`` of both volumes, on at most ``max_samples`` voxels each)
    equals ``total_variance``. Returns the two (float32) tensors."""
    channels = fixed.shape[1]
    fixed, moving = fixed.float(), moving.float()
    if region is not None and bool((region > 0.5).any()):
        index = torch.nonzero(region.reshape(-1) > 0.5).squeeze(1)
    else:
        index = torch.arange(fixed[0, 0].numel(), device=fixed.device)
    index = index[:: max(1, index.numel() // max_samples)]
    stats = torch.cat([fixed.reshape(channels, -1)[:, index], moving.reshape(channels, -1)[:, index]], dim=1)
    mean = stats.mean(dim=1).view(1, channels, 1, 1, 1)
    variance = float(stats.var(dim=1).sum())
    del stats
    scale = (total_variance / variance) ** 0.5 if variance > 0 else 1.0
    return fixed.sub_(mean).mul_(scale), moving.sub_(mean).mul_(scale)


def dino_module_availability(model: str) -> Availability:
    """Whether the DINO feature backend imports and has weights for ``model`` (never raises)."""
    try:
        from dinoreg.features.dino import dino_availability  # lazy: imports transformers-backed code; guarded
    except Exception as error:  # a missing or broken optional backend must not break the other methods
        return Availability(False, f"the DINO feature backend could not be loaded ({type(error).__name__}: {error})")
    try:
        return dino_availability(model)
    except Exception as error:
        return Availability(False, f"checking the DINO model '{model}' failed ({type(error).__name__}: {error})")


def dino_pair(pair: WorkingPair, params: dict[str, Any], problem: RegistrationProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO features of both images (joint PCA), from ``features/dino``, which normalises the raw
    intensities of the working pair itself."""
    availability = dino_module_availability(str(params["model"]))
    if not availability.ok:
        raise InputError(availability.reason)

    dino_params = {key: params[key] for key in DINO_DEFAULTS}
    return dino_feature_pair(pair.fixed, pair.moving, pair.grid, pair.fixed_mask, pair.moving_mask, dino_params,
                             problem.device, problem.progress)


@register_method
class MindZeroShot(ZeroShotMethod):
    name = "mind-zeroshot"
    label, rank = "MIND zero-shot", 30
    summary = "MIND-SSC features + ConvexAdam (convex search, then Adam); no model needed, any modality"
    presets = _presets({**COMMON_DEFAULTS, **MIND_DEFAULTS})
    mind_features = True

    def availability(self, params: dict[str, Any] | None = None) -> Availability:
        return Availability(True)

    def features(self, pair, fixed, moving, params, problem):
        return normalise_group(fixed.mind, moving.mind, fixed.region)


@register_method
class DinoZeroShot(ZeroShotMethod):
    name = "dino-zeroshot"
    label, rank = "DINO zero-shot", 20
    summary = "frozen DINOv2/v3 slice-wise features (joint PCA) + ConvexAdam (DINO-Reg); needs model weights"
    stage_weights = DINO_STAGE_WEIGHTS
    presets = _presets({**COMMON_DEFAULTS, **DINO_DEFAULTS})

    def availability(self, params: dict[str, Any] | None = None) -> Availability:
        return dino_module_availability(str((params or self.parameters())["model"]))

    def features(self, pair, fixed, moving, params, problem):
        fixed_dino, moving_dino = dino_pair(pair, params, problem)
        return normalise_group(fixed_dino, moving_dino, fixed.region)


@register_method
class DinoMind(DinoZeroShot):
    """Same availability as dino-zeroshot (the DINO model); MIND features added."""

    name = "dino-mind"
    label, rank = "DINO + MIND zero-shot", 10
    summary = "DINO + MIND-SSC features concatenated (each group normalised) + ConvexAdam; needs model weights"
    presets = _presets({**COMMON_DEFAULTS, **MIND_DEFAULTS, **DINO_DEFAULTS, "mind_weight": 0.5})
    mind_features = True

    def features(self, pair, fixed, moving, params, problem):
        weight = float(params["mind_weight"])
        if not 0.0 <= weight <= 1.0:
            raise InputError(f"mind_weight must be between 0 and 1 (got {weight}): e.g. mind_weight=0.5")
        fixed_dino, moving_dino = dino_pair(pair, params, problem)
        fixed_dino, moving_dino = normalise_group(fixed_dino, moving_dino, fixed.region, 1.0 - weight)
        fixed_mind, moving_mind = normalise_group(fixed.mind, moving.mind, fixed.region, weight)
        return torch.cat([fixed_dino, fixed_mind], dim=1), torch.cat([moving_dino, moving_mind], dim=1)

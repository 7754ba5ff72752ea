"""What every registration method provides, and the data it is given.

A method is a plugin: a subclass of :class:`Method` registered with ``@register_method``. The
pipeline runs the affine stage first (unless the method or the user turns it off), then calls
``method.run(problem, initial)``, which returns the full FIXED -> MOVING transform.

Deformable methods usually work on a *working pair*: fixed and affinely pre-aligned moving resampled
onto a near-isotropic working grid covering the fixed image (see :func:`prepare_working_pair`); they
compute a voxel displacement on that grid and hand it to :func:`dense_result`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dinoreg.core.transforms import DenseField, Transform, warp_volume
from dinoreg.core.volume import Grid, Volume
from dinoreg.errors import InputError
from dinoreg.methods import load_builtin_methods
from dinoreg.progress import Progress
from dinoreg.requirements import Availability


@dataclass
class RegistrationProblem:
    """Inputs of one registration. Volumes are never modified by methods.

    ``fixed`` and ``moving`` keep their own grids (LPS mm). Masks are binary volumes on the
    grid of the image they belong to, or None. ``params`` are the method's parameters after the
    user's overrides were merged with the method's defaults.
    """

    fixed: Volume
    moving: Volume
    fixed_mask: Volume | None = None
    moving_mask: Volume | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    params: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    #: what the method's :meth:`Method.prepare` computed from the fixed image alone, by a key of the
    #: method's choosing; ``run`` takes (pops) each value it uses, and computes it itself when absent
    prepared: dict[Any, Any] = field(default_factory=dict)


class Method:
    """Base class of registration methods. Subclasses set the class attributes and ``run``."""

    name: str = ""
    summary: str = ""
    #: "baseline" | "zero-shot" | "learned"; a plain display label; order of recommendation (lower first)
    kind: str = "baseline"
    label: str = ""
    rank: int = 100
    #: the affine stage runs before ``run`` (the user may turn it off with ``affine=False``)
    uses_affine_stage: bool = True
    #: relative expected durations of the stages ``run`` reports, for the overall progress bar
    stage_weights: dict[str, float] = {}
    #: name of the default preset
    default_preset: str = "default"
    #: preset name -> parameter values; ``presets[default_preset]`` holds every parameter
    presets: dict[str, dict[str, Any]] = {"default": {}}

    def availability(self, params: dict[str, Any] | None = None) -> Availability:
        """Whether the method can run here with ``params`` (None: its default parameters)."""
        return Availability(True)

    def parameters(self, preset: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Default parameters, updated by a preset and then by user overrides (unknown keys rejected)."""
        params = dict(self.presets[self.default_preset])
        if preset:
            if preset not in self.presets:
                raise InputError(f"unknown preset '{preset}' for method {self.name}: choose one of {sorted(self.presets)}")
            params.update(self.presets[preset])
        for key, value in (overrides or {}).items():
            if key not in params:
                raise InputError(f"unknown parameter '{key}' for method {self.name}: known parameters are {sorted(params)}")
            params[key] = coerce_like(params[key], value, key)
        return params

    def prepare(self, problem: RegistrationProblem) -> None:
        """Optional: work that needs the fixed image (and masks) only, stored in ``problem.prepared``.

        The pipeline calls it while the affine stage runs in the background, so that this work fills
        the wait. ``run`` must return the same transform whether or not ``prepare`` ran before it.
        """

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        raise NotImplementedError


def coerce_like(default: Any, value: Any, name: str = "parameter") -> Any:
    """Convert a (possibly string) override to the type of the default value.

    Raises ``InputError`` naming the parameter, the value and an example for values that do not
    convert (``adam_iterations=abc``), booleans other than true/false/yes/no/on/off/1/0, and
    non-finite numbers.
    """
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise InputError(f"parameter {name}={value!r} is not a boolean: write {name}=true or {name}=false")
    if isinstance(default, (int, float)):
        kind = int if isinstance(default, int) else float
        try:
            number = kind(value) if not isinstance(value, str) else kind(value.strip())
            if kind is int and not isinstance(value, str) and float(value) != number:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            example = f"{name}={default}"
            raise InputError(f"parameter {name}={value!r} is not {'an integer' if kind is int else 'a number'}: "
                             f"write e.g. {example}") from None
        if kind is float and not math.isfinite(number):
            raise InputError(f"parameter {name}={value!r} is not a finite number: write e.g. {name}={default}")
        return number
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """All registered methods by name (importing the built-in method modules first)."""
    load_builtin_methods()
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise InputError(f"unknown method '{name}': run 'dinoreg methods' to list them ({', '.join(sorted(methods))})")
    return methods[name]()


@dataclass
class WorkingPair:
    """Fixed and pre-aligned moving on one working grid, as torch tensors ``(1, 1, K, J, I)``.

    Intensities are untouched (methods normalise as they need); masks are float {0, 1} or None.
    """

    grid: Grid
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None


def working_grid(fixed_grid: Grid, spacing_mm: float) -> Grid:
    """Near-isotropic grid over the fixed image's box, never finer than the fixed spacing."""
    spacing = np.maximum(fixed_grid.spacing, spacing_mm) if spacing_mm > 0 else fixed_grid.spacing
    return fixed_grid.with_spacing(spacing)


def prepare_working_pair(problem: RegistrationProblem, initial: Transform, spacing_mm: float) -> WorkingPair:
    """Resample fixed (identity) and moving (through ``initial``) onto the working grid."""
    grid = working_grid(problem.fixed.grid, spacing_mm)
    fixed, fixed_mask = fixed_on_grid(problem, grid)
    moving, moving_mask = moving_on_grid(problem, initial, grid)
    return WorkingPair(grid=grid, fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask)


def fixed_on_grid(problem: RegistrationProblem, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed image and its mask (or None) resampled onto ``grid``: ``(1, 1, K, J, I)`` float32 on the problem's device."""
    identity = Transform()
    return (volume_on_grid(problem.fixed, identity, grid, "linear", problem.device, float(problem.fixed.array.min())),
            volume_on_grid(problem.fixed_mask, identity, grid, "nearest", problem.device))


def moving_on_grid(problem: RegistrationProblem, initial: Transform, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The moving image and its mask (or None) resampled through ``initial`` onto ``grid`` (as :func:`fixed_on_grid`)."""
    return (volume_on_grid(problem.moving, initial, grid, "linear", problem.device, float(problem.moving.array.min())),
            volume_on_grid(problem.moving_mask, initial, grid, "nearest", problem.device))


def volume_on_grid(volume: Volume | None, transform: Transform, grid: Grid, mode: str, device: torch.device,
                   outside: float = 0.0) -> torch.Tensor | None:
    """``volume`` sampled at ``transform(x)`` for every voxel x of ``grid``: ``(1, 1, K, J, I)`` float32 on ``device``.

    ``outside``: the value where ``transform(x)`` leaves the volume. Images are filled with their own
    minimum there (air, background), not 0: for a CT in HU, 0 is water, and uncovered slices would
    look like uniform soft tissue.
    """
    if volume is None:
        return None
    resampled = warp_volume(volume.with_array(volume.array.astype(np.float32)), transform, grid, mode, device,
                            default_value=outside)
    return torch.from_numpy(resampled.array).to(device)[None, None]


def dense_result(voxel_displacement: torch.Tensor, pair: WorkingPair, problem: RegistrationProblem,
                 initial: Transform) -> Transform:
    """Full transform from a voxel displacement ``(1, 3, K, J, I)`` on the working grid (channels as in ``geometry``).

    The field is converted to LPS mm and KEPT on the working grid (it is smooth at that scale;
    ITK, Slicer and our engine interpolate it wherever they need it), then put before
    ``initial``: ``phi(x) = initial(x + u(x))``. Keeping it there rather than on the fixed grid
    saves memory, the inverse's time and the size of transform.h5 (a 1 mm fixed grid holds
    about 3x more voxels than the 1.5 mm working grid).
    """
    field_on_working_grid = DenseField.from_voxel_displacement(voxel_displacement, pair.grid)
    return Transform([field_on_working_grid, *initial.steps])

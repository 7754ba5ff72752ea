"""One registration from volumes in memory to a result in memory (files are ``outputs.py``'s job).

Stages: affine pre-alignment -> the method (deformable or not) -> inverse -> derived maps
(warped image and labels, heatmaps, Jacobian) -> report. Inputs are never modified.
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dinoreg import __version__
from dinoreg.app.input_checks import check_registration_inputs
from dinoreg.core.intensity import foreground, normalise, robust_range
from dinoreg.core.spatial import resolve_device
from dinoreg.core.transforms import (DenseField, Transform, transform_jacobian, resample_without_transform,
                                     warp_volumes)
from dinoreg.core.volume import Volume
from dinoreg.errors import InputError, RegistrationFailed
from dinoreg.methods.base import Method, RegistrationProblem, get_method, registry
from dinoreg.optim.affine import AffineSettings, AffineStage, affine_registration
from dinoreg.peak_memory import peak_rss_mb
from dinoreg.progress import Progress
from dinoreg.report import metrics
from dinoreg.report.quality import input_warnings, result_warnings

#: methods tried in order by ``method='auto'``: the best one that can run here wins
AUTO_PREFERENCE = ["dino-mind", "dino-zeroshot", "mind-zeroshot", "affine"]


@dataclass
class RegistrationOptions:
    """What to run. ``params`` override the preset's values (keys as in ``dinoreg methods``)."""

    method: str = "auto"
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    use_affine: bool = True
    device: str = "auto"
    compute_inverse: bool = True
    compute_jacobian: bool = True


@dataclass
class RegistrationResult:
    """Everything a registration produced. Volumes are on the fixed grid unless said otherwise."""

    fixed: Volume
    transform: Transform
    inverse: Transform | None
    warped: Volume
    moving_on_fixed_grid: Volume
    heatmap: Volume
    heatmap_before: Volume
    jacobian: Volume | None
    warped_labels: Volume | None
    report: dict[str, Any]


def choose_method(options: RegistrationOptions) -> tuple[Method, dict[str, Any]]:
    """The method to run and its parameters; 'auto' takes the best that can run here.

    Availability is judged with the user's parameters (e.g. a local ``model`` folder for DINO).
    """
    if options.method != "auto":
        method = get_method(options.method)
        params = method.parameters(options.preset, options.params)
        availability = method.availability(params)
        if not availability.ok:
            raise InputError(f"method '{options.method}' cannot run here: {availability.reason}")
        return method, params
    methods = registry()
    value_errors = []
    for candidate in AUTO_PREFERENCE:
        if candidate not in methods:
            continue
        method = methods[candidate]()
        try:
            params = method.parameters(options.preset, options.params)
        except InputError as error:
            if not str(error).startswith(("unknown parameter", "unknown preset")):
                value_errors.append(str(error))  # a known parameter with a bad value: say that
            continue  # a parameter or preset this method does not know: not a candidate
        if method.availability(params).ok:
            return method, params
    if value_errors:
        raise InputError(value_errors[0])
    asked = ([f"preset {options.preset!r}"] if options.preset else []) + \
        ([f"parameter(s) {', '.join(sorted(options.params))}"] if options.params else [])
    raise InputError(f"no available method accepts {' and '.join(asked) or 'these options'}: name one with --method "
                     "(see 'dinoreg methods' for each method's presets and parameters)")


def plan_stages(progress: Progress, method_weights: dict[str, float], options: RegistrationOptions,
                use_affine: bool) -> None:
    weights = {"affine": 3.0 if use_affine else 0.0, **method_weights, "warping": 1.0}
    if options.compute_inverse:
        weights["inverse"] = 1.5
    if options.compute_jacobian:
        weights["jacobian"] = 1.0
    progress.plan(weights)


def register(fixed: Volume, moving: Volume, options: RegistrationOptions | None = None,
             fixed_mask: Volume | None = None, moving_mask: Volume | None = None,
             moving_labels: Volume | None = None, fixed_labels: Volume | None = None,
             progress: Progress | None = None, affine_stage: AffineStage | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (both LPS mm, any grids); see :class:`RegistrationOptions`.

    ``affine_stage``: the affine stage already started on these same images and masks (the command
    line starts it before loading torch); used when the method takes an affine stage, else stopped
    at once. Its owner stops it on any failure (``with AffineStage(...) as stage:``).
    Raises ``InputError`` for bad options, ``RegistrationFailed`` when the images cannot be
    aligned, ``Cancelled`` when ``progress`` was cancelled.
    """
    options = options or RegistrationOptions()
    progress = progress or Progress()
    started = time.perf_counter()
    check_inputs_finite({"fixed image": fixed, "moving image": moving, "fixed mask": fixed_mask,
                         "moving mask": moving_mask, "moving label map": moving_labels, "fixed label map": fixed_labels})
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method, params = choose_method(options)
    check_registration_inputs(fixed, moving, fixed_mask, moving_mask)
    method_name = method.name
    use_affine = options.use_affine and method.uses_affine_stage
    if affine_stage is not None and not use_affine:
        affine_stage.stop()
    plan_stages(progress, method.stage_weights, options, use_affine)
    problem = RegistrationProblem(fixed, moving, fixed_mask, moving_mask, device, params, progress)

    initial = Transform()
    if use_affine:
        progress.stage("affine")
    # First the work that needs no transform: while the affine stage runs in the background (the
    # command line's), it fills the wait for it
    before = BeforeRegistration.of(fixed, moving, fixed_mask)
    prepare(method, problem)
    if use_affine:
        try:
            if affine_stage is not None:
                initial = affine_stage.result(progress)
            else:
                initial = affine_registration(fixed, moving, progress, AffineSettings(), fixed_mask, moving_mask)
        except RuntimeError as error:
            raise too_small(error, "the affine stage", fixed, "for images under about 4 cm across, turn it off (--no-affine)")
    try:
        transform, device = run_with_cpu_fallback(method, problem, initial)
    except RuntimeError as error:
        raise too_small(error, f"method {method_name}", fixed, "use larger images or a finer working grid "
                        "(--param working_spacing_mm=...)")
    check_transform_finite(transform, method_name)

    progress.stage("warping")
    # Where every fixed voxel lands, computed once for the warps and the Jacobian when it is small
    # enough to keep (12 bytes a voxel; larger grids are mapped slab by slab in each of them).
    keep_mapped = options.compute_jacobian and fixed.grid.shape[0] * fixed.grid.shape[1] * fixed.grid.shape[2] <= MAPPED_POINTS_KEPT_VOXELS
    mapped = transform.mapped_points(fixed.grid, device) if keep_mapped else None
    to_warp = [(moving, "linear")] + ([(moving_labels, "nearest")] if moving_labels is not None else [])
    warped, *warped_rest = warp_volumes(to_warp, transform, fixed.grid, device, mapped=mapped)
    warped_labels = warped_rest[0] if warped_rest else None
    progress.update(1.0)

    inverse, inverse_residual = None, None
    if options.compute_inverse:
        progress.stage("inverse")
        inverse, inverse_residual = transform.inverse_with_residual()
    jacobian = None
    if options.compute_jacobian:
        progress.stage("jacobian")
        jacobian = fixed.with_array(transform_jacobian(transform, fixed.grid, device, mapped=mapped))
    del mapped

    warped_normalised = normalise(warped.array, before.moving_range)
    heatmap = fixed.with_array(absolute_difference(before.fixed_normalised, warped_normalised))
    progress.finish()
    report = build_report(method_name, options, params, device, use_affine, progress, started, fixed, moving,
                          before, warped_normalised, jacobian, transform)
    if inverse_residual is not None:
        report["inverse_residual_voxels_p99"] = round(inverse_residual, 4)
    if fixed_labels is not None and moving_labels is not None:
        unregistered_labels = resample_without_transform(moving_labels, fixed.grid, "nearest")
        report["labels"] = label_scores(fixed_labels, warped_labels, unregistered_labels)

    if use_affine and affine_stage is not None:  # "affine" in seconds_per_stage was the wait for it
        report["affine_stage_seconds_in_background"] = round(affine_stage.seconds or 0.0, 3)
    report["warnings"] = input_warnings({"fixed image": fixed, "moving image": moving}) + result_warnings(report)
    return RegistrationResult(fixed, transform, inverse, warped, before.moving_on_fixed_grid, heatmap, before.heatmap,
                              jacobian, warped_labels, report)


#: fixed grids up to this many voxels keep their mapped points (12 bytes a voxel) between warping and Jacobian
MAPPED_POINTS_KEPT_VOXELS = 16_000_000


def check_inputs_finite(volumes: dict[str, Volume | None]) -> None:
    """Refuse NaN/inf voxels with a one-line ``InputError`` (issue 7 bug 3).

    Non-finite voxels are refused rather than guessed at: a NaN slice usually means a broken
    conversion, and silently filling it would register something else than the user's image.
    The check is here, not only in the file readers, so API, benchmark and training callers are
    protected too.
    """
    for role, volume in volumes.items():
        if volume is None or volume.array.dtype.kind != "f":
            continue
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        if bad:
            raise InputError(f"{role} contains {bad} NaN/inf voxels: replace them (e.g. with the image minimum) "
                             "before registering, and pass a mask if those voxels hold no anatomy")


def check_transform_finite(transform: Transform, method_name: str) -> None:
    """Never hand out (or write) a transform with NaN/inf values."""
    for step in transform.steps:
        values = step.displacement if isinstance(step, DenseField) else step.homogeneous
        if not np.isfinite(values).all():
            raise RegistrationFailed(f"method {method_name} produced a non-finite transform: nothing was written; "
                                     "retry with --preset fast or a larger regularisation")


def too_small(error: RuntimeError, stage: str, fixed: Volume, fix: str) -> Exception:
    """A one-line ``RegistrationFailed`` when ITK or torch refuse a grid too small for their pyramids
    or kernels; any other error is returned unchanged (the caller raises it)."""
    message = str(error)
    if "ITK ERROR" not in message and "smaller than kernel size" not in message:
        return error
    detail = message.strip().splitlines()[-1][:120]
    return RegistrationFailed(f"{stage} cannot work on images this small ({fixed.grid.describe()}; {detail}): {fix}")


def prepare(method: Method, problem: RegistrationProblem) -> None:
    """``method.prepare(problem)``, if it succeeds: it only computes ahead what ``run`` would compute itself,
    so on any error the prepared values are dropped and ``run`` redoes the work (and reports the error in the
    pipeline's usual way); a cancel (``Cancelled``, ``KeyboardInterrupt``) is not an error and goes through."""
    try:
        method.prepare(problem)
    except Exception:
        problem.prepared.clear()


def run_with_cpu_fallback(method: Method, problem: RegistrationProblem, initial: Transform) -> tuple[Transform, torch.device]:
    """``method.run``; when the GPU runs out of memory, the same run on the CPU (with a warning).

    Returns the transform and the device the rest of the pipeline should use.
    """
    try:
        return method.run(problem, initial), problem.device
    except torch.cuda.OutOfMemoryError:
        if problem.device.type != "cuda":
            raise
    torch.cuda.empty_cache()
    warnings.warn(f"{method.name}: out of GPU memory; continuing on the CPU (slower). Use a smaller preset or "
                  "--device cpu to avoid the retry", RuntimeWarning, stacklevel=2)
    problem.device = torch.device("cpu")
    problem.prepared.clear()  # on the GPU
    problem.progress.stage(problem.progress.stage_name)
    return method.run(problem, initial), problem.device


@dataclass
class BeforeRegistration:
    """The pair before registration, on the fixed grid: the unregistered moving image, the fixed image
    robustly normalised to [0, 1] (float32 [k, j, i]), the heatmap and similarities before. Needs no transform.

    Fixed uses its own 1-99 % foreground percentiles; the unregistered moving (and the warped one,
    later) uses the ORIGINAL moving's (``moving_range``), so before and after are directly comparable.
    ``mask``: where the report's similarities are measured (the fixed mask, or the fixed foreground).
    """

    moving_on_fixed_grid: Volume
    fixed_normalised: np.ndarray
    moving_range: tuple[float, float]
    heatmap: Volume
    mask: np.ndarray
    similarity: dict[str, float]

    @staticmethod
    def of(fixed: Volume, moving: Volume, fixed_mask: Volume | None) -> "BeforeRegistration":
        moving_on_fixed_grid = resample_without_transform(moving, fixed.grid, "linear")
        moving_range = robust_range(moving.array)
        fixed_normalised = normalise(fixed.array, robust_range(fixed.array))
        moving_normalised = normalise(moving_on_fixed_grid.array, moving_range)
        heatmap = fixed.with_array(absolute_difference(fixed_normalised, moving_normalised))
        mask = fixed_mask.array.astype(bool) if fixed_mask is not None else foreground(fixed.array)
        return BeforeRegistration(moving_on_fixed_grid, fixed_normalised, moving_range, heatmap, mask,
                                  similarity(fixed_normalised, moving_normalised, mask))


def absolute_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b|`` in one new array (no second whole-volume temporary)."""
    difference = np.subtract(a, b)
    return np.abs(difference, out=difference)


def similarity(fixed_n: np.ndarray, other_n: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """NCC, NMI and mean |difference| of two normalised images over ``mask``."""
    fixed_values, other_values = fixed_n[mask], other_n[mask]
    return {
        "ncc": metrics.ncc(fixed_values, other_values),
        "nmi": metrics.nmi(fixed_values, other_values),
        "mean_abs_difference": float(np.abs(fixed_values - other_values).mean()),
    }


def label_scores(fixed_labels: Volume, warped_labels: Volume, unregistered: Volume) -> dict[str, Any]:
    after = metrics.dice_per_label(fixed_labels.array, warped_labels.array)
    before = metrics.dice_per_label(fixed_labels.array, unregistered.array, list(after))
    return {"dice_mean_before": float(np.mean(list(before.values()))) if before else None,
            "dice_mean_after": float(np.mean(list(after.values()))) if after else None,
            "dice_per_label_after": {str(k): v for k, v in after.items()}}


def build_report(method_name: str, options: RegistrationOptions, params: dict[str, Any], device: torch.device,
                 use_affine: bool, progress: Progress, started: float, fixed: Volume, moving: Volume,
                 before: BeforeRegistration, warped_normalised: np.ndarray, jacobian: Volume | None,
                 transform: Transform) -> dict[str, Any]:
    report: dict[str, Any] = {
        "dinoreg_version": __version__,
        "method": method_name,
        "preset": options.preset,
        "parameters": params,
        "affine_stage": use_affine,
        "device": device_description(device),
        "seconds_per_stage": {k: round(v, 3) for k, v in progress.stage_seconds.items()},
        "seconds_total": round(time.perf_counter() - started, 3),
        "peak_ram_mb": round(peak_rss_mb() or 0.0, 1) or None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "similarity_before": before.similarity,
        "similarity_after": similarity(before.fixed_normalised, warped_normalised, before.mask),
        "fixed_grid": fixed.grid.describe(),
        "moving_grid": moving.grid.describe(),
        "transform_steps": [type(step).__name__ for step in transform.steps],
    }
    if transform.affine is not None:
        report["affine_matrix_lps"] = transform.affine.homogeneous.round(6).tolist()
    if jacobian is not None:
        report["jacobian"] = {
            "percent_nonpositive": metrics.folding_percent(jacobian.array),
            "sdlogj": metrics.sdlogj(jacobian.array),
            "min": float(jacobian.array.min()),
            "max": float(jacobian.array.max()),
        }
    return report


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

"""Affine pre-alignment with SimpleITK's registration framework.

Moments (centre of mass + principal axes) initialisation, then rigid, then affine, each
multi-resolution, with Mattes mutual information so that different contrasts (T1/T2, MR/CT) align.
The result maps FIXED points to MOVING points (LPS mm), like every transform in this engine.

This module does not import torch (SimpleITK and numpy only): :class:`AffineStage` runs the stage
in a background thread, so that the command line can align the images on one core while the other
loads torch (``cli/main.py``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from dinoreg.core.affine_map import AffineMap
from dinoreg.core.volume import Grid, Volume
from dinoreg.errors import RegistrationFailed
from dinoreg.progress import Progress

if TYPE_CHECKING:  # torch-free at import: the command line runs this stage while torch loads (AffineStage)
    from dinoreg.core.transforms import Transform


@dataclass
class AffineSettings:
    """Parameters of the affine stage (lengths in mm, iterations per resolution level)."""

    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (6.0, 3.0, 0.0)
    rigid_iterations: int = 60
    affine_iterations: int = 60
    histogram_bins: int = 32
    sampling_fraction: float = 0.1
    #: images are smoothed and resampled to no finer than this first (3 mm: as accurate as 2 mm on
    #: brains within 0.1 mm of translation, 2.5x faster); finer deformable stages follow anyway
    working_spacing_mm: float = 3.0
    min_overlap_fraction: float = 0.05
    seed: int = 42
    #: report progress (and check for cancel) at every optimiser iteration; False: at every resolution
    #: level only (6 Python callbacks instead of up to 360: in a background thread, each one waits for
    #: the interpreter lock held by the thread loading torch, which cost 0.5 s; see AffineStage)
    progress_every_iteration: bool = True


@dataclass
class AffineInputs:
    """The images and masks of the affine stage as SimpleITK images (float32 images, uint8 masks or None),
    at their own resolution. Made by the caller's thread (:meth:`of`): each numpy-to-ITK copy needs the
    interpreter lock, and beside the thread loading torch one took 0.22 s instead of 0.015 s."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None

    @staticmethod
    def of(fixed: Volume, moving: Volume, fixed_mask: Volume | None = None,
           moving_mask: Volume | None = None) -> "AffineInputs":
        def mask_image(mask: Volume | None) -> sitk.Image | None:
            return None if mask is None else sitk.Cast(mask.to_sitk(), sitk.sitkUInt8)

        return AffineInputs(sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32), sitk.Cast(moving.to_sitk(), sitk.sitkFloat32),
                            mask_image(fixed_mask), mask_image(moving_mask))


def to_float_image(volume: Volume, working_spacing_mm: float) -> sitk.Image:
    """Float32 SimpleITK image, smoothed and resampled to no finer than ``working_spacing_mm``."""
    return coarsened(sitk.Cast(volume.to_sitk(), sitk.sitkFloat32), working_spacing_mm)


def coarsened(image: sitk.Image, working_spacing_mm: float) -> sitk.Image:
    """A float32 ``image`` smoothed and resampled to no finer than ``working_spacing_mm`` (the same box).

    On one thread: ITK's recursive Gaussian took the same time on one thread as on two (0.21 s for a
    1 mm brain on the project's 2-core CPU), and beside the thread loading torch two of them were
    slower. The same image on any number of threads (tested).
    """
    source = Grid.from_sitk(image)
    spacing = np.maximum(source.spacing, working_spacing_mm)
    if np.allclose(spacing, source.spacing):
        return image
    grid = source.with_spacing(spacing)
    sigma = np.sqrt(np.maximum(grid.spacing ** 2 - source.spacing ** 2, 0.0)) / 2.355
    smoothing = sitk.SmoothingRecursiveGaussianImageFilter()
    smoothing.SetSigma([float(max(s, 1e-3)) for s in sigma])
    smoothing.SetNumberOfThreads(1)
    resampling = sitk.ResampleImageFilter()
    resampling.SetReferenceImage(grid.to_sitk_reference())
    resampling.SetInterpolator(sitk.sitkLinear)
    resampling.SetOutputPixelType(sitk.sitkFloat32)
    resampling.SetNumberOfThreads(1)
    return resampling.Execute(smoothing.Execute(image))


def mask_on(mask: sitk.Image | None, reference: sitk.Image) -> sitk.Image | None:
    """A uint8 ``mask`` resampled (nearest) onto ``reference``'s grid; None stays None."""
    if mask is None:
        return None
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def moments_initialisation(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Centre-of-mass alignment (geometry-centre fallback when moments are degenerate), as an
    ``Euler3DTransform`` (some SimpleITK versions return the generic ``Transform`` base class)."""
    try:
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError:
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.GEOMETRY)
    return sitk.Euler3DTransform(initial.Downcast() if hasattr(initial, "Downcast") else initial)


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Euler3DTransform) -> float:
    """Fraction of fixed foreground voxels (above the median; up to about 5000 of them) that ``transform``
    maps inside the moving image's box. In numpy, not point by point through SimpleITK: this runs beside
    the thread loading torch, and 5000 interpreter-locked calls took 0.15 s there."""
    array = sitk.GetArrayViewFromImage(fixed)
    threshold = np.percentile(array, 50)
    k, j, i = np.nonzero(array > threshold)
    step = max(1, len(k) // 5000)
    index = np.stack([i[::step], j[::step], k[::step], np.ones_like(i[::step])]).astype(np.float64)  # (4, N): i, j, k, 1
    points = (Grid.from_sitk(fixed).index_to_physical @ index)[:3]
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())[:, None]
    mapped = matrix @ (points - centre) + centre + np.array(transform.GetTranslation())[:, None]
    moving_index = (Grid.from_sitk(moving).physical_to_index @ np.vstack([mapped, np.ones(mapped.shape[1])]))[:3]
    size = np.array(moving.GetSize())[:, None]
    inside = np.all((moving_index >= -0.5) & (moving_index <= size - 0.5), axis=0)
    return float(inside.sum()) / max(1, inside.size)


def metric_method(settings: AffineSettings, masks: tuple[sitk.Image | None, sitk.Image | None]) -> sitk.ImageRegistrationMethod:
    """A registration method with the Mattes-MI metric of the affine stage.

    One thread: ITK's multi-threaded metric sums its per-thread histograms in an order that
    varies between runs, so identical inputs gave slightly different transforms (NCC differing
    in the third decimal). At the affine stage's 3 mm working resolution one thread costs about
    the same CPU time and makes the result reproducible.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)
    method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    if masks[0] is not None:
        method.SetMetricFixedMask(masks[0])
    if masks[1] is not None:
        method.SetMetricMovingMask(masks[1])
    method.SetInterpolator(sitk.sitkLinear)
    return method


def metric_value(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: AffineSettings,
                 masks: tuple[sitk.Image | None, sitk.Image | None]) -> float:
    """Mattes MI (negative: lower is better) of ``transform`` at full working resolution."""
    method = metric_method(settings, masks)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


#: a transform replaces the identity only when its full-sample Mattes MI is better by more than this
#: fraction of the identity's |MI|: random-sample noise moved a real 1 mm brain registered to itself
#: to a scale of 0.998 (0.09 voxel mean drift); real misalignments gain far more (several percent)
IDENTITY_MARGIN = 0.002


def full_sample_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: AffineSettings,
                       masks: tuple[sitk.Image | None, sitk.Image | None]) -> float:
    """Mattes MI (lower is better) over EVERY voxel of the working images: deterministic, no sampling noise."""
    method = metric_method(settings, masks)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def keep_identity_unless_better(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: AffineSettings,
                                masks: tuple[sitk.Image | None, sitk.Image | None]) -> sitk.Transform:
    """``transform``, or the identity when ``transform`` does not clearly beat it (full-sample MI,
    :data:`IDENTITY_MARGIN`): the affine stage must not move when nothing needs moving."""
    identity = sitk.AffineTransform(3)
    try:
        at_identity = full_sample_metric(fixed, moving, identity, settings, masks)
    except RuntimeError:  # no overlap at identity (images far apart): the identity cannot be right
        return transform
    found = full_sample_metric(fixed, moving, transform, settings, masks)
    if found < at_identity - IDENTITY_MARGIN * abs(at_identity):
        return transform
    return identity


def run_stage(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, iterations: int,
              settings: AffineSettings, masks: tuple[sitk.Image | None, sitk.Image | None],
              progress: Progress, stage_span: tuple[float, float]) -> sitk.Transform:
    """One multi-resolution Mattes-MI optimisation of ``transform`` (updated in place and returned)."""
    method = metric_method(settings, masks)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    levels = len(settings.shrink_factors)
    counter = {"iterations": 0, "levels": 0}

    def on_iteration() -> None:
        counter["iterations"] += 1
        report(min(1.0, counter["iterations"] / (iterations * levels)))

    def on_level() -> None:  # fired as each level starts
        report(counter["levels"] / levels)
        counter["levels"] += 1

    def report(done: float) -> None:
        progress.update(stage_span[0] + (stage_span[1] - stage_span[0]) * done, check=False)
        if progress.cancel_event.is_set():
            method.StopRegistration()

    if settings.progress_every_iteration:
        method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    else:
        method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    try:
        method.Execute(fixed, moving)
    except RuntimeError as error:
        message = str(error)
        if "outside" in message.lower() or "too many samples" in message.lower() or "no valid" in message.lower():
            if not boxes_overlap(fixed, moving):
                raise RegistrationFailed("fixed and moving do not overlap during affine alignment (their boxes in "
                                         "physical space are apart): check that both images show the same anatomy and "
                                         "have correct headers (origin, direction)") from None
            # their boxes overlap: the optimisation moved the images apart, so "do not overlap" would be wrong
            raise RegistrationFailed("the affine alignment diverged (the images overlap, but the optimisation moved "
                                     "them apart): check that both images show the same anatomy, or turn the affine "
                                     "stage off (--no-affine) if they are pre-aligned") from None
        raise
    progress.check()
    return transform


def boxes_overlap(fixed: sitk.Image, moving: sitk.Image) -> bool:
    """True when the axis-aligned physical bounding boxes (LPS mm) of the two images intersect."""
    def box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        size = image.GetSize()
        corners = np.array([image.TransformContinuousIndexToPhysicalPoint(
            [(-0.5 if bit == "0" else s - 0.5) for bit, s in zip(f"{n:03b}", size)]) for n in range(8)])
        return corners.min(axis=0), corners.max(axis=0)

    (low_f, high_f), (low_m, high_m) = box(fixed), box(moving)
    return bool(np.all(np.maximum(low_f, low_m) <= np.minimum(high_f, high_m)))


def affine_registration(fixed: Volume, moving: Volume, progress: Progress, settings: AffineSettings | None = None,
                        fixed_mask: Volume | None = None, moving_mask: Volume | None = None,
                        rigid_only: bool = False) -> Transform:
    """Rigid then affine alignment; returns ``Transform([AffineMap])`` (fixed -> moving, LPS mm).

    The optimisation runs with ITK's global default of one thread (restored afterwards): the
    registration method's own thread setting does not reach every filter of its pyramid and metric,
    and with more threads identical inputs gave transforms differing by up to 2e-3 (measured on the
    demo pair). The smoothing and resampling before it run on one thread too (:func:`to_float_image`).
    """
    return align(AffineInputs.of(fixed, moving, fixed_mask, moving_mask), progress, settings, rigid_only)


def align(inputs: AffineInputs, progress: Progress, settings: AffineSettings | None = None,
          rigid_only: bool = False) -> Transform:
    """:func:`affine_registration` of images already converted to SimpleITK."""
    settings = settings or AffineSettings()
    fixed_image = coarsened(inputs.fixed, settings.working_spacing_mm)
    moving_image = coarsened(inputs.moving, settings.working_spacing_mm)
    masks = (mask_on(inputs.fixed_mask, fixed_image), mask_on(inputs.moving_mask, moving_image))
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return affine_registration_single_thread(fixed_image, moving_image, masks, progress, settings, rigid_only)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def affine_registration_single_thread(fixed_image: sitk.Image, moving_image: sitk.Image,
                                      masks: tuple[sitk.Image | None, sitk.Image | None], progress: Progress,
                                      settings: AffineSettings, rigid_only: bool) -> Transform:
    """The optimisation of :func:`affine_registration` on its prepared images, under ITK's one-thread default."""
    rigid = moments_initialisation(fixed_image, moving_image)
    initial = sitk.Euler3DTransform(rigid)
    if overlap_fraction(fixed_image, moving_image, rigid) < settings.min_overlap_fraction:
        raise RegistrationFailed("fixed and moving do not overlap after initialisation: check that both images show "
                                 "the same anatomy and have correct headers (origin, direction)")
    rigid = run_stage(fixed_image, moving_image, rigid, settings.rigid_iterations, settings, masks, progress, (0.0, 0.5))
    if rigid_only:
        if metric_value(fixed_image, moving_image, initial, settings, masks) <= metric_value(fixed_image, moving_image, rigid,
                                                                                             settings, masks):
            rigid = initial
        rigid = keep_identity_unless_better(fixed_image, moving_image, rigid, settings, masks)
        return as_transform(AffineMap.from_sitk(rigid))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine = run_stage(fixed_image, moving_image, affine, settings.affine_iterations, settings, masks, progress, (0.5, 1.0))
    # The optimiser's first, full-size steps leave the optimum when the start is already there
    # (a volume registered to itself); keep the start when the result is not better than it.
    if metric_value(fixed_image, moving_image, initial, settings, masks) <= metric_value(fixed_image, moving_image, affine,
                                                                                         settings, masks):
        affine = initial
    affine = keep_identity_unless_better(fixed_image, moving_image, affine, settings, masks)
    step = AffineMap.from_sitk(affine)
    if np.linalg.det(step.matrix) <= 0.05:
        raise RegistrationFailed("affine alignment collapsed (near-zero or negative determinant): check the inputs' "
                                 "orientation headers, or use --fixed-mask/--moving-mask to focus on the anatomy")
    return as_transform(step)


def as_transform(step: AffineMap) -> "Transform":
    """``Transform([step])``."""
    from dinoreg.core.transforms import Transform  # lazy: it imports torch, which this module must not (AffineStage)

    return Transform([step])


class AffineStage:
    """:func:`affine_registration` started in a background thread, to be collected with :meth:`result`.

    Why: the stage is SimpleITK on one thread (deterministic, see :func:`affine_registration`),
    while starting a registration spends about 1.5 s loading torch on one thread as well; run side
    by side, a 2-core CPU does both at once. SimpleITK releases the interpreter lock while it
    optimises; progress (and cancel) is checked at each resolution level, not each iteration, so that
    it rarely needs the lock (AffineSettings.progress_every_iteration). The stage reports progress to,
    and is stopped through, its own :class:`Progress`; :meth:`result` forwards both to the caller's.
    Same transform as :func:`affine_registration` (tested). Whoever starts it stops it: use it as a
    context manager (leaving the block stops it and waits for its thread).
    """

    def __init__(self, fixed: Volume, moving: Volume, fixed_mask: Volume | None = None,
                 moving_mask: Volume | None = None, settings: AffineSettings | None = None) -> None:
        settings = dataclasses.replace(settings or AffineSettings(), progress_every_iteration=False)
        self.progress = Progress()
        self.started = time.perf_counter()
        self._outcome: dict[str, object] = {}
        # waited on instead of Thread.join: a signal handler that raises inside join() (the CLI's SIGTERM)
        # makes Python 3.11 mark a still-running thread as ended (bpo-45274's fix), and the process then
        # exited with ITK still running in it and aborted
        self._finished = threading.Event()
        inputs = AffineInputs.of(fixed, moving, fixed_mask, moving_mask)
        threading.Thread(target=self._run, args=(inputs, settings), name="dinoreg-affine", daemon=True).start()

    def _run(self, inputs: AffineInputs, settings: AffineSettings) -> None:
        try:
            self._outcome["transform"] = align(inputs, self.progress, settings)
        except BaseException as error:  # handed to the caller by result()
            self._outcome["error"] = error
        self._outcome["seconds"] = time.perf_counter() - self.started
        self._finished.set()

    def result(self, progress: Progress, poll_seconds: float = 0.05) -> "Transform":
        """Wait for the stage, showing its progress in ``progress`` (whose current stage should be the
        affine one) and stopping it if ``progress`` is cancelled; its transform, or its exception."""
        while not self._finished.wait(poll_seconds):
            if progress.cancel_event.is_set():
                self.stop()
            progress.update(self.progress.stage_fraction, check=False)
        progress.check()
        if "error" in self._outcome:
            raise self._outcome["error"]  # type: ignore[misc]
        return self._outcome["transform"]  # type: ignore[return-value]

    def __enter__(self) -> "AffineStage":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the stage's thread still runs."""
        return not self._finished.is_set()

    @property
    def seconds(self) -> float | None:
        """How long the stage itself took (None while it runs)."""
        return self._outcome.get("seconds")  # type: ignore[return-value]

    def stop(self, timeout_seconds: float = 60.0) -> None:
        """Stop the stage (unused or cancelled) and wait until its thread has ended: it stops at its
        next resolution level (under a second). A process must not exit while ITK still runs in the
        thread (it aborts: "terminate called without an active exception")."""
        self.progress.cancel()
        self._finished.wait(timeout_seconds)

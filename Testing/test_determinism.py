"""Determinism: the same inputs, seed and device give the same transform, for every registered method
(bit for bit on the CPU). Methods that cannot run here (no weights) are skipped with their reason."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DEMO
from dinoreg.io.volumes import read_volume
from dinoreg.methods.base import registry
from dinoreg.app.pipeline import RegistrationOptions, register
from dinoreg.core.transforms import AffineMap, Transform

METHODS = sorted(registry())


def transform_arrays(transform: Transform) -> list[np.ndarray]:
    arrays = []
    for step in transform.steps:
        if isinstance(step, AffineMap):
            arrays += [step.matrix, step.translation]
        else:
            arrays += [step.displacement, step.grid.origin, step.grid.spacing]
    return arrays


def options_for(name: str, tiny_dino_model: str | None) -> RegistrationOptions:
    method = registry()[name]()
    params = method.parameters()
    overrides = {}
    if "model" in params and name.startswith("dino"):
        overrides = {"model": tiny_dino_model, "token_mm": 8.0, "slice_stride": 2, "pca_channels": 4}
    for key, value in (("adam_iterations", 10), ("iterations", 10)):
        if key in params:
            overrides[key] = value
    availability = method.availability(method.parameters(None, overrides))
    if not availability.ok:
        pytest.skip(f"{name} cannot run here: {availability.reason}")
    # The affine stage is tested once, as the method 'affine'; the others run without it so that a
    # failure names the part that is not reproducible (with both reproducible, so is the pipeline).
    return RegistrationOptions(method=name, params=overrides, device="cpu", use_affine=(name == "affine"),
                               compute_inverse=False, compute_jacobian=False)


@pytest.mark.parametrize("name", METHODS)
def test_same_inputs_give_the_same_transform(name, request):
    tiny = request.getfixturevalue("tiny_dino_model") if name.startswith("dino") else None
    fixed, moving = read_volume(DEMO / "MRBrainTumor1.nii.gz"), read_volume(DEMO / "MRBrainTumor2.nii.gz")
    options = options_for(name, tiny)
    first = transform_arrays(register(fixed, moving, options).transform)
    second = transform_arrays(register(fixed, moving, options).transform)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_the_affine_stage_started_in_the_background_gives_the_same_registration():
    """The command line starts the affine stage before loading torch (``optim.affine.AffineStage``):
    the pipeline then uses that stage's transform, which equals the one it computes itself."""
    from dinoreg.optim.affine import AffineStage

    fixed, moving = read_volume(DEMO / "MRBrainTumor1.nii.gz"), read_volume(DEMO / "MRBrainTumor2.nii.gz")
    options = RegistrationOptions(method="mind-zeroshot", params={"adam_iterations": 5, "refine_iterations": 3},
                                  device="cpu", compute_inverse=False, compute_jacobian=False)
    itself = register(fixed, moving, options)
    stage = AffineStage(fixed, moving)
    early = register(fixed, moving, options, affine_stage=stage)
    for a, b in zip(transform_arrays(itself.transform), transform_arrays(early.transform)):
        np.testing.assert_array_equal(a, b)
    assert stage.seconds is not None and early.report["affine_stage_seconds_in_background"] == pytest.approx(
        stage.seconds, abs=1e-3)


def test_an_unused_or_cancelled_affine_stage_is_stopped():
    """A method without an affine stage stops the one started for it; a cancel reaches a running stage."""
    from dinoreg.errors import Cancelled
    from dinoreg.optim.affine import AffineStage
    from dinoreg.progress import Progress

    fixed, moving = read_volume(DEMO / "MRBrainTumor1.nii.gz"), read_volume(DEMO / "MRBrainTumor2.nii.gz")
    stage = AffineStage(fixed, moving)
    result = register(fixed, moving, RegistrationOptions(method="identity", device="cpu", compute_inverse=False,
                                                         compute_jacobian=False), affine_stage=stage)
    assert result.transform.steps == [] or all(isinstance(s, AffineMap) for s in result.transform.steps)
    assert stage.progress.cancel_event.is_set() and not stage.running  # stopped, and its thread ended
    fresh = AffineStage(fixed, moving)
    assert fresh.running
    fresh.stop()  # waits: ITK still running in a thread when the process exits aborts it (status 134)
    assert not fresh.running
    cancelled = Progress()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        AffineStage(fixed, moving).result(cancelled)


def test_the_affine_stage_loads_no_torch():
    """What lets it run while torch loads: ``optim/affine.py`` and ``core/affine_map.py`` import no torch."""
    import subprocess
    import sys

    from conftest import REPO

    code = "import sys, dinoreg.optim.affine, dinoreg.io.volumes; assert 'torch' not in sys.modules, 'torch loaded'"
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO / "DinoRegistration"),
                                                              "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_signal_while_waiting_for_the_affine_stage_does_not_lose_its_thread():
    """The CLI's SIGTERM handler raises inside the wait: the stage must still count as running, and
    stop() must wait for it (``Thread.join`` interrupted this way marks a running thread as ended on
    Python 3.11, and the process then exited with ITK running in that thread and aborted)."""
    import signal

    from dinoreg.optim.affine import AffineStage
    from dinoreg.progress import Progress

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    fixed, moving = read_volume(DEMO / "MRBrainTumor1.nii.gz"), read_volume(DEMO / "MRBrainTumor2.nii.gz")
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        stage = AffineStage(fixed, moving)
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Interrupted):
            stage.result(Progress())
        assert stage.running
        stage.stop()
        assert not stage.running and stage.seconds is not None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_affine_stage_helpers_equal_simpleitk_point_by_point_and_on_default_threads():
    """``overlap_fraction`` (numpy) counts the same points as SimpleITK's own point mapping, and the
    one-thread smoothing and resampling (``coarsened``) give the image of SimpleITK's default threads."""
    import SimpleITK as sitk

    from dinoreg.optim import affine

    fixed, moving = read_volume(DEMO / "MRBrainTumor1.nii.gz"), read_volume(DEMO / "MRBrainTumor2.nii.gz")
    inputs = affine.AffineInputs.of(fixed, moving)
    fixed_image, moving_image = affine.coarsened(inputs.fixed, 3.0), affine.coarsened(inputs.moving, 3.0)
    grid = fixed.grid.with_spacing(np.maximum(fixed.grid.spacing, 3.0))
    sigma = [float(max(s, 1e-3)) for s in np.sqrt(np.maximum(grid.spacing ** 2 - fixed.grid.spacing ** 2, 0.0)) / 2.355]
    default_threads = sitk.Resample(sitk.SmoothingRecursiveGaussian(inputs.fixed, sigma), grid.to_sitk_reference(),
                                    sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed_image), sitk.GetArrayFromImage(default_threads))

    array = sitk.GetArrayViewFromImage(fixed_image)
    k, j, i = np.nonzero(array > np.percentile(array, 50))
    step = max(1, len(k) // 5000)
    size = np.array(moving_image.GetSize())
    for transform in (affine.moments_initialisation(fixed_image, moving_image),
                      sitk.Euler3DTransform((5.0, -3.0, 10.0), 0.3, -0.2, 0.5, (40.0, -30.0, 20.0))):
        inside = [np.all((index >= -0.5) & (index <= size - 0.5)) for index in (
            np.array(moving_image.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(
                fixed_image.TransformContinuousIndexToPhysicalPoint((float(a), float(b), float(c))))))
            for a, b, c in zip(i[::step], j[::step], k[::step]))]
        assert 0.0 < np.mean(inside) <= 1.0
        assert affine.overlap_fraction(fixed_image, moving_image, transform) == pytest.approx(np.mean(inside), abs=1e-12)

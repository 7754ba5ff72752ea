"""The whole registration as users run it: outputs exist, are in physical space, and the exported
transform resamples in SimpleITK exactly like the engine's own ``warped`` output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DEMO, shared_file
from dinoreg.app import outputs as outputs_module
from dinoreg.cli.main import main
from dinoreg.errors import Cancelled
from dinoreg.io.volumes import read_volume, write_volume
from dinoreg.methods.base import get_method
from dinoreg.app.pipeline import RegistrationOptions, register
from dinoreg.progress import Progress
from dinoreg.core.transforms import Transform, warp_volume


def sitk_resample_matches_warped(outdir: Path, fixed_path: Path, moving_path: Path, labels: bool = False) -> float:
    """Mean |SimpleITK(moving, transform.h5) - warped| inside the fixed image, as a fraction of the range."""
    fixed = sitk.ReadImage(str(fixed_path))
    moving = sitk.ReadImage(str(moving_path))
    transform = sitk.ReadTransform(str(outdir / "transform.h5"))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, moving.GetPixelID()))
    warped_image = sitk.ReadImage(str(outdir / "warped.nii.gz"))
    assert warped_image.GetPixelID() == moving.GetPixelID()
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(warped_image, getter)(), getattr(fixed, getter)(), atol=1e-4)
    warped = sitk.GetArrayFromImage(warped_image).astype(np.float64)
    fixed_array = sitk.GetArrayFromImage(fixed)
    inside = fixed_array > np.percentile(fixed_array, 20)
    moving_array = sitk.GetArrayFromImage(moving)
    return float(np.abs(resampled - warped)[inside].mean() / np.ptp(moving_array))


def inverse_round_trip_voxels(outdir: Path, fixed_path: Path) -> np.ndarray:
    """|inverse(forward(x)) - x| in fixed voxels at interior fixed voxel centres, through SimpleITK."""
    fixed = sitk.ReadImage(str(fixed_path))
    forward = sitk.ReadTransform(str(outdir / "transform.h5"))
    inverse = sitk.ReadTransform(str(outdir / "inverse_transform.h5"))
    size = np.array(fixed.GetSize())
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(300):
        index = rng.uniform(0.2 * size, 0.8 * size)
        point = np.array(fixed.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        back = np.array(inverse.TransformPoint(forward.TransformPoint(point.tolist())))
        errors.append(np.linalg.norm(back - point) / min(fixed.GetSpacing()))
    return np.array(errors)


def test_demo_writes_every_output_and_the_transform_resamples_identically(tmp_path, capsys):
    outdir = tmp_path / "demo"
    assert main(["demo", "-o", str(outdir), "--quiet"]) == 0
    assert str(outdir) in capsys.readouterr().out
    expected = {"warped.nii.gz", "heatmap.nii.gz", "heatmap_before.nii.gz", "jacobian.nii.gz", "transform.h5",
                "inverse_transform.h5", "report.json", "preview.png"}
    assert expected <= {p.name for p in outdir.iterdir()}
    fixed_path, moving_path = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"
    assert sitk_resample_matches_warped(outdir, fixed_path, moving_path) < 0.01
    assert np.median(inverse_round_trip_voxels(outdir, fixed_path)) < 0.5
    report = json.loads((outdir / "report.json").read_text())
    for key in ("method", "parameters", "device", "seconds_per_stage", "peak_ram_mb", "similarity_before",
                "similarity_after", "jacobian"):
        assert key in report
    assert report["similarity_after"]["ncc"] > report["similarity_before"]["ncc"] + 0.2
    assert report["jacobian"]["percent_nonpositive"] < 1.0
    heat_before = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "heatmap_before.nii.gz")))
    heat_after = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "heatmap.nii.gz")))
    assert 0 <= heat_after.min() and heat_after.max() <= 1 and heat_after.mean() < heat_before.mean()
    assert (outdir / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def known_deformation_case(brain_scan_2mm, tmp_path):
    """Moving = fixed seen through a known smooth field (plus a small shift): moving(y) = fixed(psi(y))."""
    from test_transforms import smooth_field

    image, labels = brain_scan_2mm
    psi = Transform([smooth_field(image.grid, 6.0, 6.0, seed=7)])
    moving = warp_volume(image, psi, image.grid)
    moving_labels = warp_volume(labels, psi, image.grid, "nearest")
    paths = {name: write_volume(volume, tmp_path / f"{name}.nii.gz") for name, volume in
             [("fixed", image), ("moving", moving), ("fixed_labels", labels), ("moving_labels", moving_labels)]}
    return paths


@pytest.mark.parametrize("method", ["affine", "mind-zeroshot"])
def test_known_deformation_outputs_are_consistent_in_itk(brain_scan_2mm, tmp_path, method):
    if not get_method(method).availability().ok:
        pytest.skip(f"{method} not available")
    paths = known_deformation_case(brain_scan_2mm, tmp_path)
    outdir = tmp_path / "out"
    extra = ["--preset", "fast"] if method != "affine" else []
    assert main(["register", str(paths["fixed"]), str(paths["moving"]), "-o", str(outdir), "--method", method,
                 "--moving-labels", str(paths["moving_labels"]), "--fixed-labels", str(paths["fixed_labels"]),
                 "--quiet", *extra]) == 0
    assert sitk_resample_matches_warped(outdir, paths["fixed"], paths["moving"]) < 0.01
    errors = inverse_round_trip_voxels(outdir, paths["fixed"])
    assert errors.mean() < 0.5 and np.percentile(errors, 95) < 0.5
    # warped labels are nearest-neighbour: only labels of the moving map appear
    warped_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "warped_labels.nii.gz")))
    moving_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["moving_labels"])))
    assert set(np.unique(warped_labels)) <= set(np.unique(moving_labels))
    report = json.loads((outdir / "report.json").read_text())
    assert report["labels"]["dice_mean_after"] >= report["labels"]["dice_mean_before"] - 0.01
    if method == "mind-zeroshot":
        assert report["labels"]["dice_mean_after"] > report["labels"]["dice_mean_before"] + 0.05


def test_clinical_anisotropic_pair_registers_in_physical_space(tmp_path):
    fixed_path = shared_file("clinical/brain1_image.nrrd")
    moving_path = shared_file("clinical/brain2_image.nrrd")
    outdir = tmp_path / "clinical"
    assert main(["register", str(fixed_path), str(moving_path), "-o", str(outdir), "--method", "affine",
                 "--moving-labels", str(shared_file("clinical/brain2_label.nrrd")), "--quiet"]) == 0
    assert sitk_resample_matches_warped(outdir, fixed_path, moving_path) < 0.01
    report = json.loads((outdir / "report.json").read_text())
    assert report["similarity_after"]["ncc"] > report["similarity_before"]["ncc"]
    labels = sitk.ReadImage(str(outdir / "warped_labels.nii.gz"))
    assert labels.GetSize() == sitk.ReadImage(str(fixed_path)).GetSize()
    # the affine maps fixed to moving physical points: the moving centre lies near the mapped fixed centre
    matrix = np.array(report["affine_matrix_lps"])
    fixed_volume, moving_volume = read_volume(fixed_path), read_volume(moving_path)
    mapped_centre = matrix[:3, :3] @ fixed_volume.grid.centre() + matrix[:3, 3]
    assert np.linalg.norm(mapped_centre - moving_volume.grid.centre()) < 40.0


def test_inputs_are_not_modified_and_cancel_raises(brain_scan_2mm):
    image, _ = brain_scan_2mm
    moving = image.with_array(np.roll(image.array, 2, axis=1))
    copies = image.array.copy(), moving.array.copy()
    progress = Progress(lambda stage, fraction, left: progress.cancel() if stage == "warping" else None)
    with pytest.raises(Cancelled):
        register(image, moving, RegistrationOptions(method="affine"), progress=progress)
    result = register(image, moving, RegistrationOptions(method="affine", compute_inverse=False))
    np.testing.assert_array_equal(image.array, copies[0])
    np.testing.assert_array_equal(moving.array, copies[1])
    assert result.inverse is None


def test_failed_write_leaves_previous_outputs_untouched(tmp_path, monkeypatch, capsys):
    outdir = tmp_path / "out"
    assert main(["demo", "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}

    def broken_preview(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs_module, "write_preview", broken_preview)
    capsys.readouterr()
    assert main(["demo", "-o", str(outdir), "--method", "affine", "--quiet"]) == 1  # one line, no traceback
    assert capsys.readouterr().err.strip() == ("dinoreg: error: cannot write the outputs: disk full: free disk space "
                                               "or choose another output folder")
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_apply_command_reproduces_warped_and_warps_labels(tmp_path):
    outdir = tmp_path / "demo"
    assert main(["demo", "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    fixed_path, moving_path = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"
    applied = tmp_path / "applied.nii.gz"
    assert main(["apply", str(outdir / "transform.h5"), str(moving_path), "-r", str(fixed_path), "-o", str(applied)]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(applied))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "warped.nii.gz"))))
    labels = read_volume(moving_path)
    labels = labels.with_array((labels.array > np.percentile(labels.array, 70)).astype(np.uint8) * 3)
    write_volume(labels, tmp_path / "labels.nii.gz")
    assert main(["apply", str(outdir / "transform.h5"), str(tmp_path / "labels.nii.gz"), "-r", str(fixed_path),
                 "-o", str(tmp_path / "warped_labels.nii.gz"), "--labels"]) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped_labels.nii.gz"))))) <= {0, 3}


def test_non_finite_voxels_are_refused_by_the_api(brain_scan_2mm):
    """Issue 7 bug 3: a NaN slice registered and reported success. ``register()`` itself refuses it."""
    from dinoreg.errors import InputError

    image, labels = brain_scan_2mm
    broken = image.with_array(image.array.astype(np.float32).copy())
    broken.array[20] = np.nan
    for fixed, moving in ((broken, image), (image, broken)):
        with pytest.raises(InputError, match="NaN/inf"):
            register(fixed, moving, RegistrationOptions(method="affine"))
    mask = image.with_array(np.where(image.array > 0, 1.0, np.inf).astype(np.float32))
    with pytest.raises(InputError, match="fixed mask"):
        register(image, image, RegistrationOptions(method="affine"), fixed_mask=mask)


def test_a_non_finite_transform_is_never_returned(brain_scan_2mm, monkeypatch):
    from dinoreg.errors import RegistrationFailed
    from dinoreg.methods.identity import IdentityMethod
    from dinoreg.core.transforms import AffineMap

    image, _ = brain_scan_2mm
    monkeypatch.setattr(IdentityMethod, "run", lambda self, problem, initial: Transform([AffineMap(np.full((3, 3), np.nan))]))
    with pytest.raises(RegistrationFailed, match="non-finite"):
        register(image, image, RegistrationOptions(method="identity"))


def test_a_failing_prepare_changes_nothing(brain_scan_2mm, monkeypatch):
    """The pipeline runs ``method.prepare`` ahead (while the affine stage runs): an error there only drops
    the prepared values, and ``run`` computes them itself (and reports its own errors as usual)."""
    from dinoreg.methods.zeroshot import MindZeroShot

    fixed, _ = brain_scan_2mm
    moving = fixed.with_array(np.roll(fixed.array, 2, axis=0))
    options = RegistrationOptions(method="mind-zeroshot", params={"adam_iterations": 3, "refine_iterations": 2},
                                  use_affine=False, compute_inverse=False, compute_jacobian=False)
    expected = register(fixed, moving, options).transform.dense.displacement

    def half_done(self, problem):
        problem.prepared["half"] = "done"
        raise RuntimeError("out of memory")

    monkeypatch.setattr(MindZeroShot, "prepare", half_done)
    np.testing.assert_array_equal(register(fixed, moving, options).transform.dense.displacement, expected)

"""Every bad input gives one clear line, a non-zero status, untouched inputs and no output folder."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DEMO, REPO
from dinoreg.cli.main import main


def write_image(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    image.SetOrigin(origin[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def blob(shape=(20, 24, 22)) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (1000 * np.exp(-3 * (i ** 2 + j ** 2 + k ** 2))).astype(np.float32)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def good_pair(tmp_path):
    return write_image(tmp_path / "fixed.nii.gz", blob()), write_image(tmp_path / "moving.nii.gz", blob())


def run_expecting_error(capsys, tmp_path, fixed: Path, moving: Path, *extra: str, status: int = 2) -> str:
    inputs = [p for p in [fixed, moving, *map(Path, extra)] if p.is_file()]
    before = {p: digest(p) for p in inputs}
    outdir = tmp_path / "out"
    code = main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet", *extra])
    error = capsys.readouterr().err.strip()
    assert code == status
    assert len(error.splitlines()) == 1 and error.startswith("dinoreg: error: ")
    assert not outdir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert {p: digest(p) for p in inputs} == before
    return error


def test_missing_file(capsys, tmp_path, good_pair):
    error = run_expecting_error(capsys, tmp_path, tmp_path / "nope.nii.gz", good_pair[1])
    assert "nope.nii.gz" in error and "does not exist" in error


def test_unreadable_file(capsys, tmp_path, good_pair):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    error = run_expecting_error(capsys, tmp_path, garbage, good_pair[1])
    assert "could not be read" in error and "garbage.nii.gz" in error


def test_2d_image(capsys, tmp_path, good_pair):
    flat = write_image(tmp_path / "flat.nrrd", blob()[10])
    assert "2D" in run_expecting_error(capsys, tmp_path, good_pair[0], flat)


def test_single_slice_3d_image(capsys, tmp_path, good_pair):
    single = write_image(tmp_path / "single.nii.gz", blob()[10:11])
    assert "single slice" in run_expecting_error(capsys, tmp_path, good_pair[0], single)


def test_4d_image(capsys, tmp_path, good_pair):
    series = tmp_path / "series.nii.gz"
    image = sitk.JoinSeries([sitk.GetImageFromArray(blob())] * 3)
    sitk.WriteImage(image, str(series))
    error = run_expecting_error(capsys, tmp_path, series, good_pair[1])
    assert "4D" in error and "time point" in error


def test_rgb_image(capsys, tmp_path, good_pair):
    rgb = np.repeat(blob()[..., None], 3, axis=-1).astype(np.uint8)
    colour = write_image(tmp_path / "rgb.nrrd", rgb, vector=True)
    assert "3 components" in run_expecting_error(capsys, tmp_path, good_pair[0], colour)


def test_constant_and_empty_images(capsys, tmp_path, good_pair):
    constant = write_image(tmp_path / "constant.nii.gz", np.full((20, 24, 22), 7, np.int16))
    assert "constant" in run_expecting_error(capsys, tmp_path, good_pair[0], constant)
    empty = write_image(tmp_path / "empty.nii.gz", np.zeros((20, 24, 22), np.float32))
    assert "constant" in run_expecting_error(capsys, tmp_path, empty, good_pair[1])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_nan_and_inf_voxels(capsys, tmp_path, good_pair, suffix):
    """(ITK's NIfTI reader replaces NaN/inf by 0 on reading: NIfTI is checked on its raw voxels.)"""
    array = blob()
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    bad = write_image(tmp_path / f"nan{suffix}", array)
    error = run_expecting_error(capsys, tmp_path, good_pair[0], bad)
    assert "2 NaN/inf voxels" in error


def test_label_map_with_other_geometry(capsys, tmp_path, good_pair):
    labels = write_image(tmp_path / "labels.nii.gz", (blob() > 500).astype(np.uint8), spacing=(1.0, 1.0, 1.0))
    error = run_expecting_error(capsys, tmp_path, *good_pair, "--moving-labels", str(labels))
    assert "does not match" in error and "resample the label map" in error


def test_images_that_do_not_overlap(capsys, tmp_path):
    fixed = write_image(tmp_path / "fixed.nii.gz", blob())
    far = np.zeros((20, 24, 22), np.float32)
    far[0:2, 0:2, 0:2] = 1000  # moving content sits at one corner; moments initialisation cannot reach it
    moving = write_image(tmp_path / "moving.nii.gz", far + blob() * 0, origin=(5000.0, 5000.0, 5000.0))
    error = run_expecting_error(capsys, tmp_path, fixed, moving, status=1)
    assert "do not overlap" in error


def test_output_folder_not_writable(capsys, tmp_path, good_pair):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = {p: digest(p) for p in good_pair}
    code = main(["register", str(good_pair[0]), str(good_pair[1]), "-o", str(blocker / "out"), "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "not writable" in error
    assert {p: digest(p) for p in good_pair} == before
    code = main(["register", str(good_pair[0]), str(good_pair[1]), "-o", "/proc/dinoreg-out", "--quiet"])
    assert code == 2 and "not writable" in capsys.readouterr().err


def test_unknown_method_and_bad_param(capsys, tmp_path, good_pair):
    assert "unknown method" in run_expecting_error(capsys, tmp_path, *good_pair, "--method", "nope")
    assert "KEY=VALUE" in run_expecting_error(capsys, tmp_path, *good_pair, "--param", "oops")


def test_console_script_reports_error_without_traceback(tmp_path):
    """The real ``dinoreg`` entry point (a subprocess), as users and the Slicer module run it."""
    result = subprocess.run([sys.executable, "-m", "dinoreg", "register", str(tmp_path / "x.nii.gz"),
                             str(DEMO / "MRBrainTumor2.nii.gz"), "-o", str(tmp_path / "out"), "--progress-json"],
                            capture_output=True, text=True, cwd=REPO / "DinoRegistration")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert '"event": "error"' in result.stdout


def test_every_bad_parameter_value_is_one_line(capsys, tmp_path, good_pair):
    """Issue 7 bug 4: ``--param adam_iterations=abc`` printed a traceback."""
    from dinoreg.methods.base import get_method

    defaults = get_method("mind-zeroshot").parameters()
    for key, default in sorted(defaults.items()):
        bad_values = ["abc"] + (["2.5"] if isinstance(default, int) and not isinstance(default, bool) else []) \
            + (["nan", "inf"] if isinstance(default, float) else [])
        for bad in bad_values:
            error = run_expecting_error(capsys, tmp_path, *good_pair, "--method", "mind-zeroshot", "--param", f"{key}={bad}")
            assert key in error, (key, bad, error)


@pytest.mark.parametrize("user_setting, expected", [
    ({}, "None 20000"),                                   # a terminal run: short spin-waits
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),      # the Slicer module's background process, or a user
    ({"GOMP_SPINCOUNT": "100"}, "PASSIVE 100"),            # a user's own spin count is kept
])
def test_a_terminal_registration_spins_briefly_unless_told_otherwise(user_setting, expected):
    """OpenMP waiting of ``dinoreg register``/``demo``: the engine's passive default becomes a short
    spin only when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT was set (and before torch loads)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user_setting, PYTHONPATH=str(REPO / "DinoRegistration"))
    code = ("import os, sys; from dinoreg.cli.main import spin_briefly_while_waiting; spin_briefly_while_waiting(); "
            "assert 'torch' not in sys.modules; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected

"""Bad-input matrix through the three entry points: the CLI, the API (``read_volume`` + ``register``)
and ``dinoreg batch``. Each case gives one line naming the problem and the fix, a non-zero exit
(CLI), an ``InputError``/``RegistrationFailed`` (API) or a failed row (batch), no output left
behind and inputs untouched; or a documented graceful result (see the last tests).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.app.batch import read_pairs, run_batch
from dinoreg.cli.main import main
from dinoreg.errors import InputError, RegistrationFailed
from dinoreg.io.volumes import read_mask, read_volume
from dinoreg.app.pipeline import RegistrationOptions, register

SHAPE = (20, 24, 22)


def blob(shape=SHAPE, shift: float = 0.0) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (1000 * np.exp(-3 * ((i - shift) ** 2 + j ** 2 + k ** 2))).astype(np.float32)


def write(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), vector=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()] if image.GetDimension() <= 3 else (*spacing, 1.0))
    image.SetOrigin(origin[: image.GetDimension()] if image.GetDimension() <= 3 else (*origin, 0.0))
    sitk.WriteImage(image, str(path))
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# Each case builds (fixed, moving, extra CLI arguments) in a folder and names the expected message.
def good(folder: Path) -> tuple[Path, Path]:
    return write(folder / "fixed.nii.gz", blob()), write(folder / "moving.nii.gz", blob(shift=0.1))


def missing(folder):
    return folder / "nope.nii.gz", good(folder)[1], []


def empty_file(folder):
    (folder / "empty.nii.gz").write_bytes(b"")
    return folder / "empty.nii.gz", good(folder)[1], []


def truncated(folder):
    fixed, moving = good(folder)
    data = fixed.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    return folder / "truncated.nii.gz", moving, []


def garbage(folder):
    (folder / "garbage.nii.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000)))
    return folder / "garbage.nii.gz", good(folder)[1], []


def directory(folder):
    (folder / "a_folder").mkdir()
    return folder / "a_folder", good(folder)[1], []


def two_d(folder):
    return write(folder / "flat.nii.gz", blob()[10]), good(folder)[1], []


def four_d(folder):
    return write(folder / "series.nii.gz", np.stack([blob()] * 3)), good(folder)[1], []


def rgb(folder):
    return write(folder / "colour.nii.gz", np.stack([blob()] * 3, axis=-1), vector=True), good(folder)[1], []


def constant(folder):
    return write(folder / "constant.nii.gz", np.full(SHAPE, 7, np.float32)), good(folder)[1], []


def non_finite(folder):
    array = blob()
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    return write(folder / "nan.nrrd", array), good(folder)[1], []


def three_voxels(folder):
    return write(folder / "tiny.nii.gz", blob((3, 3, 3))), good(folder)[1], []


def anisotropic(folder):
    return write(folder / "needle.nii.gz", blob(), spacing=(0.01, 0.01, 10.0)), good(folder)[1], []


def unsupported_type(folder):
    (folder / "notes.txt").write_text("fixed image\n")
    return folder / "notes.txt", good(folder)[1], []


def not_overlapping(folder):
    fixed, _ = good(folder)
    far = np.zeros(SHAPE, np.float32)
    far[0:2, 0:2, 0:2] = 1000
    return fixed, write(folder / "far.nii.gz", far, origin=(5000.0, 5000.0, 5000.0)), []


def labels_on_other_grid(folder):
    fixed, moving = good(folder)
    labels = write(folder / "labels.nii.gz", (blob((10, 12, 11)) > 300).astype(np.int16), spacing=(4.0, 4.0, 4.0))
    return fixed, moving, ["--moving-labels", str(labels)]


def empty_mask(folder):
    fixed, moving = good(folder)
    return fixed, moving, ["--fixed-mask", str(write(folder / "mask.nii.gz", np.zeros(SHAPE, np.uint8)))]


def over_memory_budget(folder):
    fixed, moving = good(folder)
    return fixed, moving, []


def corrupted_weights(folder):
    fixed, moving = good(folder)
    (folder / "model.safetensors").write_bytes(b"\x00corrupted" * 100)
    return fixed, moving, ["--method", "dino-zeroshot", "--param", f"model={folder / 'model.safetensors'}"]


CASES: dict[str, tuple[Callable, str, int]] = {
    "missing file": (missing, "does not exist", 2),
    "empty file": (empty_file, "could not be read", 2),
    "truncated file": (truncated, "is truncated", 2),
    "garbage file": (garbage, "could not be read", 2),
    "folder instead of file": (directory, "no DICOM series", 2),
    "2D image": (two_d, "a 3D volume is needed", 2),
    "4D image": (four_d, "is 4D", 2),
    "RGB image": (rgb, "components per voxel", 2),
    "constant image": (constant, "is constant", 2),
    "NaN and inf voxels": (non_finite, "NaN/inf", 2),
    "3-voxel volume": (three_voxels, "at least 4 voxels along each axis", 2),
    "1000:1 anisotropic spacing": (anisotropic, "1000:1", 2),
    "unsupported file type": (unsupported_type, "use NIfTI, NRRD, MHA/MHD, MGZ or a DICOM series folder", 2),
    "non-overlapping pair": (not_overlapping, "do not overlap", 1),
    "labels on another grid": (labels_on_other_grid, "resample the label map", 2),
    "empty mask": (empty_mask, "mask is empty", 2),
    "over the memory budget": (over_memory_budget, "memory budget", 2),
    "corrupted weights file": (corrupted_weights, "corrupted", 2),
}


@pytest.fixture
def small_budget_for(monkeypatch):
    def apply(case: str) -> None:
        if case == "over the memory budget":
            monkeypatch.setenv("DINOREG_MEMORY_BUDGET_MB", "0.1")  # never allocate GBs to test this
    return apply


@pytest.mark.parametrize("case", list(CASES))
def test_cli(case, tmp_path, capsys, small_budget_for):
    build, message, status = CASES[case]
    small_budget_for(case)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    fixed, moving, extra = build(inputs)
    before = digest(inputs)
    outdir = tmp_path / "out"
    code = main(["register", str(fixed), str(moving), "-o", str(outdir), "--quiet", "--method", "affine", *extra])
    error = capsys.readouterr().err.strip()
    assert code == status, error
    assert len(error.splitlines()) == 1 and error.startswith("dinoreg: error: ") and "Traceback" not in error
    assert message in error
    assert not outdir.exists() and [p.name for p in tmp_path.iterdir()] == ["inputs"]  # nothing left behind
    assert digest(inputs) == before


@pytest.mark.parametrize("case", list(CASES))
def test_api(case, tmp_path, small_budget_for):
    build, message, _ = CASES[case]
    small_budget_for(case)
    fixed, moving, extra = build(tmp_path)
    options = dict(zip(extra[::2], extra[1::2]))
    method = options.get("--method", "affine")
    params = dict([options["--param"].split("=", 1)]) if "--param" in options else {}
    with pytest.raises((InputError, RegistrationFailed)) as raised:
        fixed_volume, moving_volume = read_volume(fixed, "fixed image"), read_volume(moving, "moving image")
        mask = read_mask(options["--fixed-mask"], fixed_volume, "fixed mask") if "--fixed-mask" in options else None
        if "--moving-labels" in options:
            read_mask(options["--moving-labels"], moving_volume, "moving label map")
        register(fixed_volume, moving_volume, RegistrationOptions(method=method, params=params, device="cpu"), fixed_mask=mask)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_batch_reports_every_bad_pair_and_registers_the_good_one(tmp_path, monkeypatch):
    """One table holding every file-level case plus a good pair: each bad row fails with its reason."""
    rows, expected = [], {}
    for number, (case, (build, message, _)) in enumerate(CASES.items()):
        if case in ("over the memory budget", "empty mask", "labels on another grid", "corrupted weights file"):
            continue  # options of the whole batch or columns, tested below and in test_batch.py
        folder = tmp_path / f"case{number:02d}"
        folder.mkdir()
        fixed, moving, _ = build(folder)
        rows.append([fixed, moving])
        expected[len(rows)] = message
    rows.append(list(good(tmp_path)))
    (tmp_path / "empty_mask.nii.gz").write_bytes(b"")
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["fixed", "moving"], *rows])
    outdir = tmp_path / "out"
    results = run_batch(read_pairs(table, "affine"), outdir)
    for number, message in expected.items():
        row = results[number - 1]
        assert row["status"] == "failed" and message in row["reason"] and "\n" not in row["reason"], (number, row)
        assert not (outdir / row["pair"]).exists()
    assert results[-1]["status"] == "ok" and (Path(results[-1]["folder"]) / "report.json").is_file()
    monkeypatch.setenv("DINOREG_MEMORY_BUDGET_MB", "0.1")
    over = run_batch(read_pairs(table, "affine")[-1:], tmp_path / "out2")
    assert over[0]["status"] == "failed" and "memory budget" in over[0]["reason"]


def test_batch_output_folder_not_writable(tmp_path, capsys):
    fixed, moving = good(tmp_path)
    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving\n{fixed},{moving}\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["batch", str(table), "-o", str(blocker / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not writable" in error


def test_cli_output_folder_not_writable(tmp_path, capsys):
    fixed, moving = good(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["register", str(fixed), str(moving), "-o", str(blocker / "out"), "--quiet", "--method", "affine"]) == 2
    assert "not writable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- graceful results

def test_single_nonzero_voxel_gives_a_finite_result(tmp_path):
    """Documented graceful result: an image with one non-zero voxel registers (nothing to align), finite outputs."""
    fixed = write(tmp_path / "fixed.nii.gz", blob())
    dot = np.zeros(SHAPE, np.float32)
    dot[10, 12, 11] = 1000
    moving = write(tmp_path / "dot.nii.gz", dot)
    result = register(read_volume(fixed), read_volume(moving), RegistrationOptions(method="affine", device="cpu"))
    assert np.isfinite(result.warped.array).all() and np.isfinite(result.jacobian.array).all()


def test_empty_label_map_gives_a_result_without_dice(tmp_path, capsys):
    """Documented graceful result: an all-zero moving label map is warped (still all zero); no Dice."""
    fixed, moving = good(tmp_path)
    labels = write(tmp_path / "labels.nii.gz", np.zeros(SHAPE, np.int16))
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "out"), "--quiet", "--method", "affine",
                 "--moving-labels", str(labels)]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "warped_labels.nii.gz")))
    assert not warped.any()


def test_small_images_without_affine_stage(tmp_path):
    """Images too small for the affine pyramid: a one-line error naming the fix. Without the affine
    stage, an 8 mm cube registers with MIND (its box filters work on windows wider than the image;
    torch's pooling used to refuse them): finite, no folding, closer to the fixed image."""
    small = blob((8, 8, 8))
    fixed = read_volume(write(tmp_path / "f.nii.gz", small, spacing=(1.0, 1.0, 1.0)))
    moving = read_volume(write(tmp_path / "m.nii.gz", np.roll(small, 1, axis=2), spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(RegistrationFailed, match="--no-affine"):
        register(fixed, moving, RegistrationOptions(method="affine", device="cpu"))
    deformable = register(fixed, moving, RegistrationOptions(method="mind-zeroshot", use_affine=False, device="cpu"))
    assert np.isfinite(deformable.warped.array).all() and deformable.report["jacobian"]["percent_nonpositive"] == 0.0
    assert deformable.report["similarity_after"]["ncc"] > deformable.report["similarity_before"]["ncc"] + 0.05
    result = register(fixed, moving, RegistrationOptions(method="affine", use_affine=False, device="cpu"))
    assert np.isfinite(result.warped.array).all()

"""Issue 19: input-handling defects. Checks chosen by what a file is (not its name), geometry the
outputs could not honour, batch tables and resume, the memory budget from the header, failed
registrations reported as such, the real peak memory, and one-line messages."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.cli.main import main
from dinoreg.errors import InputError
from dinoreg.io.volumes import read_volume

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Demo"
FIXED, MOVING = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"


def blob(shape=(20, 24, 22), shift: float = 0.0) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (1000 * np.exp(-3 * ((i - shift) ** 2 + j ** 2 + k ** 2))).astype(np.float32)


def write(path: Path, array: np.ndarray, spacing=(4.0, 4.0, 4.0), compress: bool = True) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), compress)
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def sheared_nrrd(folder: Path) -> Path:
    """The issue's NRRD: ``space directions: (5,0,0) (2.5,5,0) (0,0,5)`` (sheared axes)."""
    path = write(folder / "sheared.nrrd", blob(), spacing=(5.0, 5.0, 5.0), compress=False)
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    lines = [b"space directions: (5,0,0) (2.5,5,0) (0,0,5)" if line.startswith(b"space directions:") else line
             for line in head.split(b"\n")]
    path.write_bytes(b"\n".join(lines) + sep + body)
    return path


def test_non_orthonormal_direction_is_refused(tmp_path):
    with pytest.raises(InputError, match="non-orthonormal direction"):
        read_volume(sheared_nrrd(tmp_path), "moving image")


def test_non_orthonormal_direction_gives_one_line_and_no_itk_warning(tmp_path):
    moving = sheared_nrrd(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO / "DinoRegistration"))
    done = subprocess.run([sys.executable, "-m", "dinoreg.cli.main", "register", str(FIXED), str(moving),
                           "-o", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [line for line in done.stderr.strip().splitlines()
                                                if line.startswith("dinoreg: error:")]
    assert len(done.stderr.strip().splitlines()) == 1 and "WARNING" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_nan_voxels_in_a_nifti_pair_are_refused(tmp_path):
    data = blob().transpose(2, 1, 0).copy()
    data[5, 5, 5] = np.nan
    nibabel.save(nibabel.Nifti1Pair(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(tmp_path / "nan.hdr"))
    for name in ("nan.hdr", "nan.img"):
        with pytest.raises(InputError, match="NaN/inf voxels"):
            read_volume(tmp_path / name, "moving image")


def test_uncompressed_nifti_named_gz_cut_short_is_refused(tmp_path):
    plain = write(tmp_path / "plain.nii", blob(), compress=False).read_bytes()
    misnamed = tmp_path / "short.nii.gz"
    misnamed.write_bytes(plain[: len(plain) * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        read_volume(misnamed, "moving image")


def test_nan_in_nifti_misnamed_as_gz_is_refused(tmp_path):
    data = blob().transpose(2, 1, 0).copy()
    data[1, 2, 3] = np.inf
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(tmp_path / "inf.nii"))
    (tmp_path / "inf.nii").rename(tmp_path / "inf.nii.gz")
    with pytest.raises(InputError, match="NaN/inf"):
        read_volume(tmp_path / "inf.nii.gz", "fixed image")


def test_unreadable_file_message_has_no_build_path_and_no_self_suggestion(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(gzip.compress(b"not an image at all" * 50))
    with pytest.raises(InputError) as caught:
        read_volume(bad, "fixed image")
    message = str(caught.value)
    assert "could not be read" in message and ".cxx" not in message and "/src/" not in message
    assert "use NIfTI" not in message and "convert it to NRRD" in message


def test_batch_row_with_more_fields_than_header(tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving\n{FIXED},{MOVING},extra\n")
    assert main(["batch", str(table), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "more fields than the header" in one_error_line(capsys)


def test_batch_resume_reruns_pairs_asked_differently(tmp_path):
    from dinoreg.app.batch import BatchSettings, read_pairs, run_batch

    fixed, moving = write(tmp_path / "f.nii.gz", blob()), write(tmp_path / "m.nii.gz", blob(shift=0.1))
    table = tmp_path / "pairs.csv"
    table.write_text("fixed,moving\nf.nii.gz,m.nii.gz\n")
    outdir = tmp_path / "out"
    rows = run_batch(read_pairs(table, "identity"), outdir)
    assert rows[0]["method"] == "identity"
    assert run_batch(read_pairs(table, "identity"), outdir)[0]["status"] == "ok (earlier run)"
    rows = run_batch(read_pairs(table, "affine"), outdir)  # another method: redone
    assert rows[0]["status"].startswith("ok") and "earlier" not in rows[0]["status"] and rows[0]["method"] == "affine"
    rows = run_batch(read_pairs(table, "affine"), outdir, BatchSettings(use_affine=False))  # other settings
    assert "earlier" not in rows[0]["status"]
    write(moving, blob(shift=0.2))  # the input changed on disk
    os.utime(moving, ns=(1, 1))
    assert "earlier" not in run_batch(read_pairs(table, "affine"), outdir, BatchSettings(use_affine=False))[0]["status"]
    report = json.loads(next(outdir.glob("0001_*/report.json")).read_text())
    assert report["method"] == "affine" and report["request"]["use_affine"] is False


def test_memory_budget_is_checked_from_the_header_before_reading(monkeypatch):
    import dinoreg.io.volumes as io_module

    def must_not_read(*args, **kwargs):
        raise AssertionError("voxels read before the budget check")

    monkeypatch.setenv("DINOREG_MEMORY_BUDGET_MB", "1")
    monkeypatch.setattr(io_module.sitk, "ReadImage", must_not_read)
    with pytest.raises(InputError, match="memory budget") as caught:
        read_volume(FIXED, "fixed image")
    assert "0.0 GB" not in str(caught.value)


def test_budget_message_never_says_zero_gb(monkeypatch):
    from dinoreg.app.input_checks import check_memory_budget
    from dinoreg.core.volume import Volume

    monkeypatch.setenv("DINOREG_MEMORY_BUDGET_MB", "0.01")
    volume = Volume.from_array_ras(blob())
    with pytest.raises(InputError) as caught:
        check_memory_budget(volume, volume)
    assert "0.0 GB" not in str(caught.value) and "MB" in str(caught.value)


def test_label_maps_passed_as_images_are_warned_about(tmp_path, capsys):
    labels = (blob() > 300).astype(np.int16) + (blob() > 700).astype(np.int16)
    fixed = write(tmp_path / "f.nii.gz", labels)
    moving = write(tmp_path / "m.nii.gz", (blob(shift=0.1) > 300).astype(np.int16))
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "out"), "--method", "identity",
                 "--quiet"]) == 0
    assert "distinct values" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("label map" in warning for warning in report["warnings"])


def test_noise_registration_is_not_reported_as_a_plain_success(tmp_path, capsys):
    fixed = write(tmp_path / "f.nii.gz", blob())
    noise = np.random.default_rng(3).normal(500, 100, blob().shape).astype(np.float32)
    moving = write(tmp_path / "m.nii.gz", noise)
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "out"), "--method", "identity",
                 "--quiet"]) == 0
    assert "dinoreg: warning: similarity" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]


def test_folding_above_threshold_is_warned_about():
    from dinoreg.report.quality import result_warnings

    report = {"similarity_before": {"ncc": 0.5}, "similarity_after": {"ncc": 0.9},
              "jacobian": {"percent_nonpositive": 17.5}}
    assert any("folded" in warning for warning in result_warnings(report))
    report["jacobian"]["percent_nonpositive"] = 0.01
    assert result_warnings(report) == []


PEAK_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {engine!r})
import dinoreg.app.outputs as outputs
from dinoreg.io.volumes import read_volume
from dinoreg.peak_memory import peak_rss_mb
from dinoreg.app.pipeline import RegistrationOptions, register

original = outputs.write_preview
def current_rss_mb():
    import os
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def heavy_preview(*args):  # writing that needs memory (as gzip/ITK writers of big volumes do): 300 MB over the peak
    block = np.ones(int((peak_rss_mb() - current_rss_mb() + 300) * 2**20) // 8)
    original(*args)
    return block.sum()
outputs.write_preview = heavy_preview
result = register(read_volume({fixed!r}), read_volume({moving!r}), RegistrationOptions(method="identity"))
before_writing = peak_rss_mb()
outputs.write_outputs(result, {outdir!r})
report = json.load(open({outdir!r} + "/report.json"))
print(json.dumps({{"before": before_writing, "reported": report["peak_ram_mb"], "after": peak_rss_mb()}}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for the current RSS")
def test_peak_ram_includes_writing_the_outputs(tmp_path):
    script = PEAK_SCRIPT.format(engine=str(REPO / "DinoRegistration"), fixed=str(FIXED), moving=str(MOVING),
                                outdir=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert numbers["reported"] >= numbers["before"] + 250
    assert numbers["reported"] <= numbers["after"] + 1


def test_fixed_labels_without_moving_labels_is_refused(tmp_path, capsys):
    assert main(["register", str(FIXED), str(MOVING), "-o", str(tmp_path / "out"), "--fixed-labels", str(FIXED),
                 "--quiet"]) == 2
    assert "--moving-labels" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("param, expected", [("x=", "has no value"),
                                             ("adam_iterations=abc", "is not an integer")])
def test_param_messages_name_the_real_problem(tmp_path, capsys, param, expected):
    assert main(["register", str(FIXED), str(MOVING), "-o", str(tmp_path / "out"), "--param", param, "--quiet"]) == 2
    line = one_error_line(capsys)
    assert expected in line and "preset None" not in line


def test_qform_sform_disagreement_says_which_is_used(tmp_path):
    data = blob().transpose(2, 1, 0).copy()
    qform = np.diag([4.0, 4.0, 4.0, 1.0])
    sform = qform.copy()
    sform[:3, 3] = [40.0, 0.0, 0.0]  # 40 mm apart, as in the issue
    image = nibabel.Nifti1Image(data, sform)
    image.header.set_qform(qform, code=1)
    image.header.set_sform(sform, code=2)
    nibabel.save(image, str(tmp_path / "both.nii.gz"))
    with pytest.warns(UserWarning, match=r"qform and sform disagree by up to 40.0 mm; the (sform|qform) is used") as caught:
        volume = read_volume(tmp_path / "both.nii.gz", "moving image")
    used = "sform" if "the sform is used" in str(caught[0].message) else "qform"
    expected_origin = (sform if used == "sform" else qform)[:3, 3] * [-1, -1, 1]
    np.testing.assert_allclose(volume.grid.origin, expected_origin, atol=1e-3)


def test_diverging_affine_on_overlapping_images_is_not_told_they_do_not_overlap(monkeypatch):
    import dinoreg.optim.affine as affine
    from dinoreg.errors import RegistrationFailed
    from dinoreg.progress import Progress
    from dinoreg.core.volume import Volume

    def diverge(self, fixed, moving):  # what ITK raises when the optimisation leaves the moving image
        raise RuntimeError("Too many samples map outside moving image buffer")

    monkeypatch.setattr(affine.sitk.ImageRegistrationMethod, "Execute", diverge)
    volume = Volume.from_array_ras(blob(), (4.0, 4.0, 4.0))
    with pytest.raises(RegistrationFailed) as caught:
        affine.affine_registration(volume, volume, Progress())
    assert "do not overlap" not in str(caught.value) and "diverged" in str(caught.value)


def test_budget_refusal_comes_before_the_voxels_of_a_float_image_are_scanned(tmp_path, monkeypatch):
    import dinoreg.io.file_checks as file_checks

    path = write(tmp_path / "float.nii.gz", blob())
    monkeypatch.setenv("DINOREG_MEMORY_BUDGET_MB", "0.001")
    monkeypatch.setattr(file_checks, "check_finite", lambda *args: pytest.fail("voxels scanned before the budget"))
    with pytest.raises(InputError, match="memory budget"):
        read_volume(path, "fixed image")

"""Issue 19: the output policy. ``-o`` must be a new folder, an empty one or an earlier result of
ours; never an input's folder (or above it), the current folder or the home folder; replacing an
earlier result removes only our own files. Every refusal is one line, before any work, and leaves
every file byte-identical. Output files honour the user's umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.cli.main import main
from dinoreg.errors import InputError

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Demo"
FIXED, MOVING = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def blob(shift: float = 0.0) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 24, 22)), indexing="ij")
    return (1000 * np.exp(-3 * ((i - shift) ** 2 + j ** 2 + k ** 2))).astype(np.float32)


@pytest.fixture
def study(tmp_path) -> Path:
    """The issue's example: the two demo images and the user's notes in one folder."""
    folder = tmp_path / "study"
    folder.mkdir()
    for image in (FIXED, MOVING):
        shutil.copy(image, folder / image.name)
    (folder / "notes.txt").write_text("x\n")
    return folder


@pytest.fixture
def small_pair(tmp_path) -> tuple[Path, Path]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, shift in (("fixed.nii.gz", 0.0), ("moving.nii.gz", 0.1)):
        image = sitk.GetImageFromArray(blob(shift))
        image.SetSpacing((4.0, 4.0, 4.0))
        sitk.WriteImage(image, str(inputs / name))
    return inputs / "fixed.nii.gz", inputs / "moving.nii.gz"


def refused(argv: list[str], capsys, *protected: Path) -> str:
    """Run the CLI; assert it refuses (rc 2) with one line and every protected tree is unchanged."""
    before = {folder: tree_digest(folder) for folder in protected}
    status = main(argv)
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert len(error.splitlines()) == 1 and error.startswith("dinoreg: error: ")
    for folder in protected:
        assert tree_digest(folder) == before[folder]
    return error


def test_issue_example_output_in_the_inputs_folder_is_refused(study, capsys):
    error = refused(["register", str(study / FIXED.name), str(study / MOVING.name), "-o", str(study), "--quiet"],
                    capsys, study)
    assert "contains the input" in error
    assert sorted(p.name for p in study.iterdir()) == sorted([FIXED.name, MOVING.name, "notes.txt"])


def test_output_above_an_input_is_refused(study, capsys):
    error = refused(["register", str(study / FIXED.name), str(study / MOVING.name), "-o", str(study.parent),
                     "--quiet"], capsys, study)
    assert "contains the input" in error


def test_current_folder_and_empty_output_are_refused(small_pair, monkeypatch, capsys):
    fixed, moving = small_pair
    monkeypatch.chdir(fixed.parent.parent)
    for output in (".", "", "./"):
        error = refused(["register", str(fixed), str(moving), "-o", output, "--quiet"], capsys, fixed.parent)
        assert "current folder" in error or "is empty" in error


def test_home_folder_and_above_are_refused(small_pair, tmp_path, monkeypatch, capsys):
    fixed, moving = small_pair
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    for output in ("~", str(home), str(home.parent)):
        error = refused(["register", str(fixed), str(moving), "-o", output, "--quiet"], capsys, home)
        assert "home folder" in error


def test_foreign_non_empty_folder_is_refused(small_pair, tmp_path, capsys):
    fixed, moving = small_pair
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    error = refused(["register", str(fixed), str(moving), "-o", str(other), "--quiet"], capsys, other)
    assert "not written by dinoreg" in error


def test_rerun_into_own_output_replaces_only_our_files(small_pair, tmp_path, capsys):
    fixed, moving = small_pair
    outdir = tmp_path / "result"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["register", str(fixed), str(moving), "-o", str(empty), "--method", "affine", "--quiet"]) == 0
    assert (empty / "report.json").is_file()
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    first = json.loads((outdir / "report.json").read_text())
    assert "inverse_transform.h5" in first["outputs"]
    (outdir / "my_notes.txt").write_text("keep me")
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet",
                 "--no-inverse"]) == 0
    names = sorted(p.name for p in outdir.iterdir() if not p.name.startswith("."))
    assert "my_notes.txt" in names and (outdir / "my_notes.txt").read_text() == "keep me"
    assert "inverse_transform.h5" not in names  # our stale file of the first run is gone
    assert "inverse_transform.h5" not in json.loads((outdir / "report.json").read_text())["outputs"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_result_written_before_the_marker_is_recognised(small_pair, tmp_path):
    """A report.json with our schema (written by an older version) makes the folder ours."""
    fixed, moving = small_pair
    outdir = tmp_path / "old"
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    (outdir / ".dinoreg-output.json").unlink()
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_killed_runs_staging_is_cleaned_only_when_ours(small_pair, tmp_path):
    fixed, moving = small_pair
    outdir = tmp_path / "result"
    ours = tmp_path / ".result.tmp-killed"
    ours.mkdir()
    (ours / "warped.nii.gz").write_bytes(b"half written")
    (ours / ".dinoreg-staging.json").write_text(json.dumps({"tool": "dinoreg", "kind": "registration",
                                                            "pid": dead_pid()}))
    foreign = tmp_path / ".result.tmp-user"  # same pattern, no marker: not ours
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"user data")
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    assert not ours.exists()
    assert (foreign / "data.bin").read_bytes() == b"user data"


def test_staging_with_an_unknown_file_keeps_that_file(tmp_path):
    from dinoreg.app.output_policy import remove_stale_staging

    stale = tmp_path / ".out.tmp-1"
    stale.mkdir()
    (stale / ".dinoreg-staging.json").write_text(json.dumps({"tool": "dinoreg", "pid": dead_pid()}))
    (stale / "report.json").write_text("{}")
    (stale / "someone_elses.txt").write_text("keep")
    remove_stale_staging(tmp_path / "out")
    assert sorted(p.name for p in stale.iterdir()) == ["someone_elses.txt"]


def test_api_write_outputs_obeys_the_same_rule(study, small_pair):
    from dinoreg.io.volumes import read_volume
    from dinoreg.app.outputs import write_outputs
    from dinoreg.app.pipeline import RegistrationOptions, register

    fixed, moving = small_pair
    result = register(read_volume(fixed), read_volume(moving), RegistrationOptions(method="affine"))
    before = tree_digest(study)
    with pytest.raises(InputError, match="not written by dinoreg"):
        write_outputs(result, study)
    with pytest.raises(InputError, match="contains the input"):
        write_outputs(result, fixed.parent.parent, {"fixed": str(fixed), "moving": str(moving)})
    assert tree_digest(study) == before


def test_batch_output_above_inputs_or_foreign_is_refused(study, tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving\n{study / FIXED.name},{study / MOVING.name}\n")
    error = refused(["batch", str(table), "-o", str(study), "--quiet", "--workers", "1"], capsys, study)
    assert "contains the input" in error
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused(["batch", str(table), "-o", str(foreign), "--quiet", "--workers", "1"], capsys, foreign, study)
    error = refused(["batch", str(table), "-o", str(tmp_path), "--quiet", "--workers", "1"], capsys, study)
    assert "contains the input" in error  # the table's own folder


def test_batch_pair_folder_not_ours_fails_that_pair_and_is_kept(small_pair, tmp_path):
    from dinoreg.app.batch import read_pairs, run_batch

    fixed, moving = small_pair
    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving\n{fixed},{moving}\n")
    pairs = read_pairs(table, "affine")
    outdir = tmp_path / "out"
    run_batch([], outdir)
    squatter = outdir / pairs[0].name
    squatter.mkdir()
    (squatter / "partial_notes.txt").write_text("user file")  # no report.json: old code deleted this folder
    rows = run_batch(pairs, outdir)
    assert rows[0]["status"] == "failed" and "not written by dinoreg" in rows[0]["reason"]
    assert (squatter / "partial_notes.txt").read_text() == "user file"


def test_apply_refuses_to_overwrite_its_input(small_pair, tmp_path, capsys):
    fixed, moving = small_pair
    outdir = tmp_path / "result"
    assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
    for target in (moving, fixed, outdir / "transform.h5"):
        error = refused(["apply", str(outdir / "transform.h5"), str(moving), "-r", str(fixed), "-o", str(target)],
                        capsys, fixed.parent, outdir)
        assert "is the input" in error


def test_demo_refuses_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    error = refused(["demo", "-o", ".", "--quiet"], capsys, tmp_path)
    assert "current folder" in error


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(small_pair, tmp_path, umask):
    fixed, moving = small_pair
    outdir = tmp_path / "result"
    previous = os.umask(umask)
    try:
        assert main(["register", str(fixed), str(moving), "-o", str(outdir), "--method", "affine", "--quiet"]) == 0
        table = tmp_path / "pairs.csv"
        table.write_text(f"fixed,moving\n{fixed},{moving}\n")
        assert main(["batch", str(table), "-o", str(tmp_path / "batch"), "--method", "affine", "--quiet",
                     "--workers", "1"]) == 0
    finally:
        os.umask(previous)
    files = [p for p in outdir.iterdir()] + list((tmp_path / "batch").rglob("*"))
    for path in files:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
    assert stat.S_IMODE(outdir.stat().st_mode) == 0o777 & ~umask

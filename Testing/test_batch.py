"""``dinoreg batch``: one folder per pair, resumable, failures isolated, local pool and a Dask cluster."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dinoreg.app.batch import BatchSettings, read_pairs, run_batch
from dinoreg.cli.main import main
from dinoreg.errors import InputError


def write_image(path: Path, array: np.ndarray, spacing=(3.0, 3.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def blob(shift: float = 0.0, shape=(14, 16, 15)) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (1000 * np.exp(-4 * ((i - shift) ** 2 + j ** 2 + 1.5 * k ** 2))).astype(np.float32)


def labels_of(image: np.ndarray) -> np.ndarray:
    return (image > 300).astype(np.int16) + (image > 700).astype(np.int16)


@pytest.fixture
def table(tmp_path):
    """Three pairs: two good ones (with label maps on the first) and one whose moving file is missing."""
    data = tmp_path / "data"
    data.mkdir()
    fixed = write_image(data / "fixed.nii.gz", blob())
    moving = write_image(data / "moving.nii.gz", blob(0.25))
    write_image(data / "fixed_labels.nii.gz", labels_of(blob()))
    write_image(data / "moving_labels.nii.gz", labels_of(blob(0.25)))
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "method"])
        writer.writerow(["data/fixed.nii.gz", "data/moving.nii.gz", "data/fixed_labels.nii.gz", "data/moving_labels.nii.gz", "affine"])
        writer.writerow(["data/fixed.nii.gz", "data/missing.nii.gz", "", "", ""])
        writer.writerow([str(moving), str(fixed), "", "", "identity"])
    return path


def summary(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_batch_cli_registers_good_pairs_and_reports_the_failed_one(tmp_path, table, capsys):
    outdir = tmp_path / "out"
    code = main(["batch", str(table), "-o", str(outdir), "--method", "affine", "--workers", "1", "--quiet"])
    assert code == 1  # one pair failed
    rows = summary(outdir)
    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert "missing.nii.gz" in rows[1]["reason"] and "does not exist" in rows[1]["reason"]
    assert [row["method"] for row in rows] == ["affine", "affine", "identity"]  # row value, else --method
    assert float(rows[0]["dice_after"]) > float(rows[0]["dice_before"])  # labels given: Dice recorded
    assert float(rows[0]["ncc_after"]) > float(rows[0]["ncc_before"]) and float(rows[0]["ncc_after"]) > 0.95
    for row in (rows[0], rows[2]):
        folder = Path(row["folder"])
        assert (folder / "report.json").is_file() and (folder / "transform.h5").is_file()
    assert not (outdir / rows[1]["pair"]).exists()  # a failed pair leaves nothing behind
    report = (outdir / "summary.md").read_text()
    assert "2 of 3 pairs registered, 1 failed" in report and "## Failures" in report and rows[1]["reason"] in report
    assert "pair 0002" in capsys.readouterr().err


def test_resume_skips_complete_pairs_and_redoes_half_written_ones(tmp_path, table):
    outdir = tmp_path / "out"
    pairs = [pair for pair in read_pairs(table, "affine") if "missing" not in pair.moving]
    run_batch(pairs, outdir)
    first, second = (outdir / pair.name for pair in pairs)
    stamp = (first / "report.json").stat().st_mtime_ns
    # a killed run of the second pair: its staging folder half-written, the final folder absent
    (second / "report.json").unlink()
    (outdir / f".{second.name}.tmp-abc").mkdir()
    (outdir / f".{second.name}.tmp-abc" / "warped.nii.gz").write_bytes(b"half")
    # ours: the staging marker of a process that no longer runs (a folder without it is left alone)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (outdir / f".{second.name}.tmp-abc" / ".dinoreg-staging.json").write_text(
        json.dumps({"tool": "dinoreg", "kind": "registration", "pid": dead.pid}))
    rows = run_batch(pairs, outdir)
    assert [row["status"] for row in rows] == ["ok (earlier run)", "ok"]
    assert (first / "report.json").stat().st_mtime_ns == stamp  # not redone
    assert (second / "report.json").is_file()
    assert not list(outdir.glob(".*.tmp-*"))
    assert json.loads((first / "report.json").read_text())["method"] == "affine"


def test_local_process_pool(tmp_path, table):
    outdir = tmp_path / "out"
    rows = run_batch(read_pairs(table, "identity"), outdir, BatchSettings(device="cpu"), workers=2)
    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert all((Path(row["folder"]) / "report.json").is_file() for row in rows if row["status"] == "ok")


def test_dask_local_cluster_of_two_workers(tmp_path, table):
    distributed = pytest.importorskip("distributed")
    outdir = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows = run_batch(read_pairs(table, "affine"), outdir, BatchSettings(device="cpu", threads=1),
                         scheduler=cluster.scheduler_address)
        workers = set(cluster.scheduler_info["workers"])
    assert len(workers) == 2
    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert float(rows[0]["dice_after"]) > float(rows[0]["dice_before"])
    assert summary(outdir)[1]["status"] == "failed"


@pytest.mark.parametrize("content, message", [
    ("", "has no rows"),
    ("moving\na.nii.gz\n", "lacks the column(s) fixed"),
    ("fixed,moving,colour\na,b,red\n", "unknown column(s) colour"),
    ("fixed,moving\na.nii.gz,\n", "row 1 has no fixed or moving path"),
])
def test_bad_tables(tmp_path, capsys, content, message):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_missing_table_and_unreachable_scheduler(tmp_path, table, monkeypatch):
    monkeypatch.setattr("dinoreg.app.batch.SCHEDULER_TIMEOUT", "2s")
    with pytest.raises(InputError, match="does not exist"):
        read_pairs(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        run_batch(read_pairs(table), tmp_path / "out", scheduler="tcp://127.0.0.1:1")

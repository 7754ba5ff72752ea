"""Fuzz-style inputs (seeded, generated): odd NIfTI headers, geometries, pixel types, truncations,
misnamed files and batch tables. Properties asserted for every case:

- no traceback: a case is either accepted or refused with one ``InputError`` line;
- no silent zero-fill: an accepted file reads back exactly the voxels that were written, and a
  truncated file is always refused;
- no partial output: a refused run leaves no output folder and no staging folder;
- inputs byte-identical afterwards (every input hashed before and after).
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest

from dinoreg.cli.main import main
from dinoreg.errors import InputError
from dinoreg.io.volumes import read_volume

SEED = 19
SHAPE = (12, 10, 9)  # (i, j, k) as nibabel stores it
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def random_affine(rng: random.Random) -> tuple[np.ndarray, bool]:
    """A voxel-to-RAS affine: a random rotation (or, sometimes, a sheared matrix) with odd spacings
    and origins; returns it and whether its axes are orthogonal."""
    q, _ = np.linalg.qr(np.array([[rng.gauss(0, 1) for _ in range(3)] for _ in range(3)]))
    spacing = np.array([rng.choice([0.3, 1.0, 2.5, 7.0]) for _ in range(3)])
    matrix = q @ np.diag(spacing)
    orthogonal = True
    if rng.random() < 0.3:
        matrix[:, 1] += matrix[:, 0] * rng.choice([0.3, 0.5, 1.0])
        orthogonal = False
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = [rng.choice([0.0, -120.5, 1e5, 3.3]) for _ in range(3)]
    return affine, orthogonal


def random_data(rng: random.Random, dtype: type) -> np.ndarray:
    generator = np.random.default_rng(rng.randrange(1 << 30))
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    high = min(int(info.max), 3000) if info else 3000.0
    low = max(int(info.min), -1000) if info else -1000.0
    data = generator.uniform(low, high, SHAPE)
    return data.astype(dtype)


def make_case(rng: random.Random, folder: Path, number: int) -> tuple[Path, dict]:
    """One generated file and what it must do: ``expect`` is 'refuse', 'accept' or 'either'."""
    dtype = rng.choice(DTYPES)
    data = random_data(rng, dtype)
    affine, orthogonal = random_affine(rng)
    flavour = rng.choice(["nii", "nii.gz", "pair", "misnamed-gz", "misnamed-plain"])
    mutation = rng.choice(["none", "none", "nan", "truncate", "zero-pixdim", "constant"])
    if mutation == "nan":
        data = data.astype(np.float32)
        data[rng.randrange(SHAPE[0]), rng.randrange(SHAPE[1]), rng.randrange(SHAPE[2])] = rng.choice([np.nan, np.inf])
    if mutation == "constant":
        data = np.full(SHAPE, 7, dtype=dtype)
    klass = nibabel.Nifti1Pair if flavour == "pair" else nibabel.Nifti1Image
    image = klass(data, affine, dtype=data.dtype)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    if mutation == "zero-pixdim":
        image.header["pixdim"][2] = 0.0
    stem = folder / f"case{number:03d}"
    if flavour == "pair":
        path = Path(f"{stem}.hdr")
        nibabel.save(image, str(path))
        data_file = Path(f"{stem}.img")
    else:
        written = Path(f"{stem}.{'nii.gz' if flavour in ('nii.gz', 'misnamed-plain') else 'nii'}")
        nibabel.save(image, str(written))
        # misnamed-gz: plain bytes under a .nii.gz name; misnamed-plain: gzip bytes under a .nii name
        path = {"misnamed-gz": Path(f"{stem}.nii.gz"), "misnamed-plain": Path(f"{stem}.nii")}.get(flavour, written)
        if path != written:
            written.rename(path)
        data_file = path
    if mutation == "truncate":
        raw = data_file.read_bytes()
        data_file.write_bytes(raw[: rng.randrange(len(raw) // 3, len(raw) - 1)])
    if mutation in ("nan", "truncate", "constant") or not orthogonal:
        expect = "refuse"
    elif mutation == "zero-pixdim" or flavour == "misnamed-plain":
        expect = "either"  # ITK decides how to read these; accepted only if the voxels are exact
    else:
        expect = "accept"
    return path, {"data": data, "expect": expect, "mutation": mutation, "flavour": flavour, "dtype": dtype}


def test_generated_headers_pixel_types_and_truncations(tmp_path):
    rng = random.Random(SEED)
    folder = tmp_path / "inputs"
    folder.mkdir()
    cases = [make_case(rng, folder, number) for number in range(60)]
    before = digest(folder)
    outcomes = []
    for path, case in cases:
        try:
            volume = read_volume(path, "moving image")
        except InputError as error:
            message = str(error)
            assert "\n" not in message and message, (path.name, case["mutation"])
            assert case["expect"] in ("refuse", "either"), (path.name, case["flavour"], case["mutation"], message)
            outcomes.append("refused")
            continue
        assert case["expect"] in ("accept", "either"), (path.name, case["flavour"], case["mutation"])
        # exactly the voxels written (no zero-fill, no scaling), in [k, j, i] order
        expected = case["data"].transpose(2, 1, 0)
        assert volume.array.shape == expected.shape
        np.testing.assert_array_equal(volume.array.astype(np.float64), expected.astype(np.float64))
        outcomes.append("accepted")
    assert digest(folder) == before
    assert outcomes.count("accepted") >= 10 and outcomes.count("refused") >= 10  # the generator covers both


def test_generated_cli_runs_leave_complete_output_or_none(tmp_path, capsys):
    rng = random.Random(SEED + 1)
    folder = tmp_path / "inputs"
    folder.mkdir()
    good_data = (1000 * np.exp(-((np.indices((20, 22, 18)) - 9.0) ** 2).sum(0) / 30)).astype(np.float32)
    good = folder / "good.nii.gz"
    nibabel.save(nibabel.Nifti1Image(good_data, np.diag([4.0, 4.0, 4.0, 1.0])), str(good))
    cases = [make_case(rng, folder, number)[0] for number in range(10)]
    before = digest(folder)
    for number, moving in enumerate(cases):
        outdir = tmp_path / f"out{number}"
        status = main(["register", str(good), str(moving), "-o", str(outdir), "--method", "identity", "--quiet",
                       "--no-inverse"])
        error = capsys.readouterr().err.strip()
        if status == 0:
            assert (outdir / "report.json").is_file() and (outdir / "warped.nii.gz").is_file()
        else:
            assert status in (1, 2) and error.startswith("dinoreg: error:") and len(error.splitlines()) == 1
            assert not outdir.exists()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert digest(folder) == before


CSV_PIECES = ["fixed", "moving", "method", "preset", "fixed_mask", "bogus", "", " moving ", '"fixed"']


def test_generated_batch_tables_give_one_line_or_run(tmp_path, capsys):
    rng = random.Random(SEED + 2)
    folder = tmp_path / "inputs"
    folder.mkdir()
    image = folder / "img.nii.gz"
    data = (1000 * np.exp(-((np.indices((20, 22, 18)) - 9.0) ** 2).sum(0) / 30)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(image))
    for number in range(25):
        header = [rng.choice(CSV_PIECES) for _ in range(rng.randrange(1, 5))]
        if rng.random() < 0.6:
            header = ["fixed", "moving"] + header[: rng.randrange(0, 2)]
        rows = []
        for _ in range(rng.randrange(0, 3)):
            width = len(header) + rng.choice([-1, 0, 0, 1, 2])
            rows.append([rng.choice([str(image), "img.nii.gz", "", "missing.nii.gz", "a,b", "identity"])
                         for _ in range(max(width, 0))])
        text = ",".join(header) + "\n" + "\n".join(",".join(row) for row in rows)
        if rng.random() < 0.2:
            text = "\ufeff" + text
        table = folder / f"table{number}.csv"
        table.write_text(text + ("\n" if rng.random() < 0.5 else ""), encoding="utf-8")
        before = digest(folder)
        outdir = tmp_path / f"out{number}"
        status = main(["batch", str(table), "-o", str(outdir), "--method", "identity", "--quiet", "--workers", "1"])
        error = capsys.readouterr().err.strip()
        assert status in (0, 1, 2), text
        if status == 2:
            assert len(error.splitlines()) == 1 and error.startswith("dinoreg: error:"), (text, error)
            assert not outdir.exists()
        else:
            assert (outdir / "summary.csv").is_file()
            for line in error.splitlines():
                assert line.startswith(("dinoreg: pair", "dinoreg: warning")) or "pairs registered" in line, line
        assert not [p for p in outdir.rglob("*") if ".tmp-" in p.name] if outdir.exists() else True
        assert digest(folder) == before
        shutil.rmtree(outdir, ignore_errors=True)

"""Metrics against values computed by hand, and the ``dinoreg evaluate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinoreg.report import metrics
from dinoreg.cli.main import main
from dinoreg.io.volumes import write_volume
from dinoreg.io.itk_files import write_transform
from dinoreg.core.transforms import AffineMap, Transform
from dinoreg.core.volume import Grid, Volume


def test_dice_per_label_hand_computed():
    fixed = np.zeros((4, 4, 4), dtype=int)
    warped = np.zeros((4, 4, 4), dtype=int)
    fixed[0, :2, :2] = 1     # 4 voxels
    warped[0, :2, :1] = 1    # 2 voxels, both inside label 1 of fixed
    fixed[2, :, :] = 2       # 16 voxels
    warped[3, :, :] = 2      # 16 voxels, no overlap
    warped[1, 0, 0] = 3      # only in warped
    scores = metrics.dice_per_label(fixed, warped)
    assert scores == {1: pytest.approx(2 * 2 / 6), 2: pytest.approx(0.0)}
    assert metrics.dice_per_label(fixed, warped, [3]) == {3: 0.0}


def test_hd95_of_shifted_cubes_in_mm():
    """Two 10-voxel cubes shifted by 3 voxels along k with 2 mm spacing: every surface distance
    is at most 6 mm and the far faces are exactly 6 mm apart."""
    a = np.zeros((30, 20, 20), dtype=bool)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = True
    b[8:18, 5:15, 5:15] = True
    distance = metrics.hd95(a, b, (2.0, 1.0, 1.0))
    assert 0 < distance <= 6.0
    assert metrics.hd95(a, a, (2.0, 1.0, 1.0)) == 0.0
    # pure translation of a thin plate: every surface voxel is exactly 3 voxels * 2 mm away
    plate_a = np.zeros((30, 20, 20), dtype=bool)
    plate_b = np.zeros_like(plate_a)
    plate_a[10, 5:15, 5:15] = True
    plate_b[13, 5:15, 5:15] = True
    assert metrics.hd95(plate_a, plate_b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)


def test_sdlogj_and_folding_hand_computed():
    jacobian = np.ones((10, 10, 10), dtype=np.float32)
    interior = jacobian[2:-2, 2:-2, 2:-2]  # the 6x6x6 region the metrics look at
    interior[:3] = np.e          # half of the interior: log J = 1
    interior[3:] = 1.0           # other half: log J = 0
    assert metrics.sdlogj(jacobian) == pytest.approx(0.5, abs=1e-6)
    jacobian[2, 2, 2] = -0.5
    jacobian[0, 0, 0] = -1.0     # in the cropped border: ignored
    assert metrics.folding_percent(jacobian) == pytest.approx(100.0 / 216)


@pytest.mark.parametrize("shape", [(37, 11, 9), (5, 6, 7)])
def test_sdlogj_by_slabs_equals_the_whole_volume_formula(shape):
    """Merging the slabs' means and squared deviations gives the whole-volume value (folded voxels clipped)."""
    rng = np.random.default_rng(3)
    jacobian = np.exp(rng.normal(0.1, 0.3, size=shape)).astype(np.float32)
    jacobian[4, 3, 3] = -0.2
    expected = float(np.log(np.clip(jacobian[2:-2, 2:-2, 2:-2], 1e-9, None).astype(np.float64)).std())
    assert metrics.sdlogj(jacobian, slab=4) == pytest.approx(expected, rel=1e-12)


def test_landmark_tre_and_similarity():
    errors = metrics.landmark_tre(np.array([[0, 0, 0], [1, 1, 1.0]]), np.array([[3, 4, 0], [1, 1, 1.0]]))
    np.testing.assert_allclose(errors, [5.0, 0.0])
    rng = np.random.default_rng(0)
    a = rng.random((8, 8, 8))
    assert metrics.ncc(a, 2 * a + 3) == pytest.approx(1.0)
    assert metrics.ncc(a, -a) == pytest.approx(-1.0)
    assert metrics.nmi(a, a) == pytest.approx(2.0)


def test_evaluate_command_reports_dice_jacobian_and_tre(tmp_path, capsys):
    grid = Grid((10, 10, 10), spacing=(1.0, 1.0, 2.0))
    fixed = np.zeros(grid.shape, dtype=np.int16)
    warped = np.zeros(grid.shape, dtype=np.int16)
    fixed[2:6, 2:6, 2:6] = 1
    warped[2:6, 2:6, 3:7] = 1
    write_volume(Volume(fixed, grid), tmp_path / "fixed.nii.gz")
    write_volume(Volume(warped, grid), tmp_path / "warped.nii.gz")
    write_volume(Volume(np.full(grid.shape, 2.0, np.float32), grid), tmp_path / "jac.nii.gz")
    write_transform(Transform([AffineMap(np.eye(3), np.array([1.0, 0.0, 0.0]))]), tmp_path / "t.h5")
    (tmp_path / "f.csv").write_text("x,y,z\n0,0,0\n10,0,0\n")
    (tmp_path / "m.csv").write_text("x,y,z\n1,0,0\n11,3,4\n")
    status = main(["evaluate", "--fixed-labels", str(tmp_path / "fixed.nii.gz"), "--warped-labels",
                   str(tmp_path / "warped.nii.gz"), "--jacobian", str(tmp_path / "jac.nii.gz"), "--transform",
                   str(tmp_path / "t.h5"), "--fixed-landmarks", str(tmp_path / "f.csv"), "--moving-landmarks",
                   str(tmp_path / "m.csv"), "--json"])
    assert status == 0
    results = json.loads(capsys.readouterr().out)
    assert results["dice_mean"] == pytest.approx(2 * 48 / 128)
    assert results["sdlogj"] == pytest.approx(0.0)
    assert results["percent_nonpositive_jacobian"] == 0.0
    assert results["tre_mean_mm"] == pytest.approx(2.5)          # errors 0 and 5 mm
    assert results["tre_mean_mm_before"] == pytest.approx((1 + np.sqrt(26)) / 2)


def test_slicer_fcsv_landmarks_are_converted_from_ras(tmp_path):
    from dinoreg.io.landmarks import read_landmarks

    (tmp_path / "p.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
                                     "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                     "vtkMRMLMarkupsFiducialNode_0,10,20,30,0,0,0,1,1,1,0,F-1,,\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "p.fcsv"), [[-10, -20, 30]])


def test_nmi_equals_the_histogram2d_definition_with_values_on_bin_edges_and_outside():
    rng = np.random.default_rng(5)
    a = rng.random(20000)
    b = np.clip(0.6 * a + 0.4 * rng.random(20000), 0, 1)
    a[:40] = np.linspace(0, 1, 33)[rng.integers(0, 33, 40)]  # exactly on bin edges, including 0 and 1
    b[40:50] = 1.5  # outside [0, 1]: not counted, as in histogram2d's range
    joint, _, _ = np.histogram2d(a, b, bins=32, range=[[0, 1], [0, 1]])
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return -(q * np.log(q)).sum()

    expected = (entropy(p.sum(0)) + entropy(p.sum(1))) / entropy(p.ravel())
    assert metrics.nmi(a, b) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < metrics.nmi(a, b) < 2.0

"""The Slicer Logic with awkward inputs, on a real MRML scene (slicer-core): masks under other parent
transforms than their image, bad volumes, output nodes to reuse, and where output files are kept.
Whatever happens, inputs are not modified and a failed run leaves the scene as it was."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package is not slicer-core", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import slicer.util  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "DinoRegistration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DinoRegistrationLib.job import RegistrationError, JobOptions  # noqa: E402
from DinoRegistrationLib.logic import DinoRegistrationLogic, runFolder  # noqa: E402
from test_slicer_logic import (FIXED_MATRIX, MODULE_DIR, add_pair, add_volume, assert_unchanged, ijk_to_ras,  # noqa: E402
                               new_scene, node_ids, private_temp_folder, snapshot, temp_dirs)  # noqa: F401 (autouse)

FAST = dict(device="cpu", computeInverse=False, computeJacobian=False)
SHIFT = np.array([10.0, -6.0, 4.0])  # RAS mm


@pytest.fixture
def logic():
    return DinoRegistrationLogic(pythonExecutable=sys.executable, engineDirectory=str(MODULE_DIR))


def translation_node(scene, offset):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def mask_world_centre_ras(path: str) -> np.ndarray:
    """Centre, in world RAS mm, of the non-zero voxels of an exported (LPS) mask file."""
    image = sitk.ReadImage(path)
    k, j, i = np.nonzero(sitk.GetArrayFromImage(image))
    points = [image.TransformContinuousIndexToPhysicalPoint((float(a), float(b), float(c))) for a, b, c in zip(i, j, k)]
    return np.mean(points, axis=0) * (-1, -1, 1)


def box_mask(scene, matrix, name="mask", labelmap=True):
    """A box of ones on a 16^3 grid; returns the node and the box centre in the node's own RAS frame."""
    array = np.zeros((16, 16, 16), np.int16)
    array[4:10, 5:12, 6:11] = 1
    node = add_volume(scene, name, array, matrix, labelmap=labelmap)
    k, j, i = np.nonzero(array)
    centre = (np.stack([i, j, k, np.ones_like(i)], -1).astype(float) @ matrix.T)[:, :3].mean(0)
    return node, centre


@pytest.mark.parametrize("where", ["image moved", "mask moved", "both moved differently"])
def test_label_map_mask_lands_where_it_is_shown_whatever_the_parent_transforms(logic, tmp_path, where):
    """The mask is exported onto its image's grid where both are in the world: a mask drawn on the same voxel
    grid as its image but under another parent transform must move with its own transform (today's code
    treated them as the same grid, or Slicer's resampler dropped the transforms)."""
    scene = new_scene()
    fixed, moving = add_pair(scene)
    mask, centre = box_mask(scene, FIXED_MATRIX)  # same voxel grid as the fixed image
    image_shift = SHIFT if where != "mask moved" else np.zeros(3)
    mask_shift = {"image moved": np.zeros(3), "mask moved": SHIFT, "both moved differently": -SHIFT / 2}[where]
    if image_shift.any():
        fixed.SetAndObserveTransformNodeID(translation_node(scene, image_shift).GetID())
    if mask_shift.any():
        mask.SetAndObserveTransformNodeID(translation_node(scene, mask_shift).GetID())
    ids, before = node_ids(scene), snapshot(mask)
    paths = logic.exportInputs(str(tmp_path), fixed, moving, fixedMask=mask)
    assert np.allclose(mask_world_centre_ras(paths["fixedMask"]), centre + mask_shift, atol=1.5)
    fixed_file, mask_file = sitk.ReadImage(paths["fixed"]), sitk.ReadImage(paths["fixedMask"])
    assert mask_file.GetSize() == fixed_file.GetSize() and np.allclose(mask_file.GetOrigin(), fixed_file.GetOrigin())
    assert node_ids(scene) == ids
    assert_unchanged(mask, before)


def test_segmentation_mask_under_another_transform_lands_where_it_is_shown(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    labelmap, centre = box_mask(scene, ijk_to_ras(np.eye(3), (2.0, 2.0, 2.0), (-16.0, -16.0, -16.0)), "labels")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organ")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    segmentation.SetAndObserveTransformNodeID(translation_node(scene, SHIFT).GetID())
    ids = node_ids(scene)
    paths = logic.exportInputs(str(tmp_path), fixed, moving, fixedMask=segmentation)
    assert np.allclose(mask_world_centre_ras(paths["fixedMask"]), centre + SHIFT, atol=1.5)
    assert node_ids(scene) == ids


def test_mask_under_a_non_linear_transform_is_refused_in_one_line(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    mask, _ = box_mask(scene, FIXED_MATRIX)
    bend = scene.AddNewNodeByClass("vtkMRMLTransformNode", "bend")
    grid = slicer.vtkOrientedGridTransform()
    field = slicer.vtkImageData() if hasattr(slicer, "vtkImageData") else __import__("vtk").vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.AllocateScalars(__import__("vtk").VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(1.0)
    grid.SetDisplacementGridData(field)
    bend.SetAndObserveTransformFromParent(grid)
    mask.SetAndObserveTransformNodeID(bend.GetID())
    ids = node_ids(scene)
    with pytest.raises(RegistrationError, match="non-linear transform") as error:
        logic.exportInputs(str(tmp_path), fixed, moving, fixedMask=mask)
    assert "\n" not in str(error.value) and node_ids(scene) == ids


def test_bad_volumes_are_refused_in_one_line_before_anything_runs(logic):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids, dirs = node_ids(scene), temp_dirs()
    for args, expected in (((None, moving), "fixed volume"), ((fixed, None), "moving volume"),
                           ((fixed, moving, JobOptions(outputVolume=moving)), "output volume is an input")):
        with pytest.raises(RegistrationError, match=expected) as error:
            logic.startRegistration(*args)
        assert "\n" not in str(error.value)
    assert node_ids(scene) == ids and temp_dirs() == dirs


def test_non_finite_voxels_never_give_a_non_finite_result(logic):
    """A NaN slice: either a one-line refusal with the scene unchanged, or a result with finite values only
    (the engine decides which; issue 7)."""
    scene = new_scene()
    fixed, moving = add_pair(scene)
    array = slicer.util.arrayFromVolume(moving)
    array[5] = np.nan
    slicer.util.arrayFromVolumeModified(moving)
    ids, before = node_ids(scene), snapshot(moving)
    try:
        result = logic.register(fixed, moving, JobOptions(method="affine", **FAST), timeout=300)
    except RegistrationError as error:
        assert "\n" not in str(error) and node_ids(scene) == ids
    else:
        assert np.isfinite(slicer.util.arrayFromVolume(result.warpedVolume)).all()
        matrix = result.transform.GetTransformFromParent()
        assert np.isfinite(matrix.TransformPoint(0.0, 0.0, 0.0)).all()
    after = snapshot(moving)
    assert np.array_equal(after[0], before[0], equal_nan=True) and after[2:] == before[2:]


def test_results_fill_the_chosen_output_nodes_and_files_go_to_a_new_folder_per_run(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    output_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")
    output_transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform")
    options = JobOptions(method="affine", outputVolume=output_volume, outputTransform=output_transform,
                                  outputDirectory=str(tmp_path / "kept"), **FAST)
    (tmp_path / "kept").mkdir()
    first = logic.register(fixed, moving, options, timeout=300)
    assert first.warpedVolume is output_volume and first.transform is output_transform
    assert output_volume.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    assert output_transform.GetTransformFromParent() is not None
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    assert "moving warped" not in names and "moving to fixed" not in names  # nothing duplicated
    second = logic.register(fixed, moving, options, timeout=300)
    runs = sorted(p for p in (tmp_path / "kept").iterdir())
    assert len(runs) == 2 and {first.outputDirectory, second.outputDirectory} == {str(p) for p in runs}
    assert all((run / "transform.h5").is_file() and run.name.startswith("moving ") for run in runs)
    assert not (tmp_path / "kept" / "transform.h5").exists()  # nothing written straight into the chosen folder


def test_run_folders_are_new_and_need_a_chosen_folder(tmp_path):
    now = time.mktime((2026, 11, 30, 8, 15, 0, 0, 0, -1))
    first = Path(runFolder(str(tmp_path), "MR/brain: 2", now))
    assert first.parent == tmp_path and first.name == "MR_brain_ 2 2026-11-30 081500"
    first.mkdir()
    assert Path(runFolder(str(tmp_path), "MR/brain: 2", now)).name == "MR_brain_ 2 2026-11-30 081500 2"
    with pytest.raises(RegistrationError, match="Choose a folder"):
        runFolder("", "moving")


def test_an_engine_refusal_is_one_line_and_leaves_the_scene_and_files_unchanged(logic):
    """A blank moving volume (no structure to align) is refused by the engine: one line, nothing added."""
    scene = new_scene()
    fixed, moving = add_pair(scene)
    slicer.util.arrayFromVolume(moving)[:] = 7.0
    slicer.util.arrayFromVolumeModified(moving)
    ids, dirs, before = node_ids(scene), temp_dirs(), snapshot(moving)
    with pytest.raises(RegistrationError) as error:
        logic.register(fixed, moving, JobOptions(method="affine", **FAST), timeout=300)
    assert str(error.value) and "\n" not in str(error.value) and error.value.details
    assert node_ids(scene) == ids and temp_dirs() == dirs
    assert_unchanged(moving, before)

"""The Slicer module's Logic on a real MRML scene (headless, with the ``slicer-core`` package).

The engine runs as in Slicer: its command line in a background process (``sys.executable -m
dinoreg``). Where a test needs an engine that is slow or crashes on purpose, a stand-in
package is put first on the engine's PYTHONPATH. Skipped when slicer-core is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package is not slicer-core", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
sys.path.insert(0, str(MODULE_DIR))

from DinoRegistrationLib import methods as method_list  # noqa: E402
from DinoRegistrationLib.job import RegistrationError, JobOptions  # noqa: E402
from DinoRegistrationLib.logic import DinoRegistrationLogic  # noqa: E402
from DinoRegistrationLib.process import formatSeconds, unexpectedExitMessage  # noqa: E402

FAST = dict(device="cpu", computeInverse=False, computeJacobian=False)


# ---------------------------------------------------------------------------------------------- scene helpers

def new_scene():
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)  # registers segmentation node classes
    return scene


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def ijk_to_ras(directions: np.ndarray, spacing, origin) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = directions @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def add_volume(scene, name: str, array: np.ndarray, matrix: np.ndarray, labelmap: bool = False):
    """Volume node from an array indexed [k, j, i] and a 4x4 IJK-to-RAS matrix."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT if labelmap else vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def ras_points(matrix: np.ndarray, shape) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk @ matrix.T)[..., :3]


BLOB_CENTRES = [(-12, -8, 4, 900), (10, -4, -6, 600), (2, 12, 8, 750), (-4, 6, -10, 500), (8, 10, 2, 400)]


def blobs(points: np.ndarray) -> np.ndarray:
    """A smooth test image defined in RAS mm: a few Gaussian blobs of different brightness."""
    value = np.zeros(points.shape[:-1])
    for x, y, z, amplitude in BLOB_CENTRES:
        value += amplitude * np.exp(-((points - (x, y, z)) ** 2).sum(-1) / (2 * 6.0 ** 2))
    return (value + 20).astype(np.float32)


FIXED_MATRIX = ijk_to_ras(rotation(2, 20) @ rotation(0, 10), (1.9, 2.1, 2.4), (-24.0, -22.0, -20.0))
MOVING_MATRIX = ijk_to_ras(np.diag([-1.0, 1.0, 1.0]) @ rotation(1, -15), (2.2, 2.0, 2.0), (25.0, -24.0, -22.0))
SHIFT_RAS = np.array([3.0, -2.0, 1.5])  # moving content = fixed content moved by this


def add_pair(scene, shape=(22, 24, 26)):
    """Fixed and moving volumes of the same content, moved by SHIFT_RAS, on differently oriented grids."""
    fixed = add_volume(scene, "fixed", blobs(ras_points(FIXED_MATRIX, shape)), FIXED_MATRIX)
    moving_shape = (24, 26, 24)
    moving = add_volume(scene, "moving", blobs(ras_points(MOVING_MATRIX, moving_shape) - SHIFT_RAS), MOVING_MATRIX)
    return fixed, moving


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def snapshot(node) -> tuple:
    """What must not change on an input node: voxels, geometry, storage and parent transform."""
    return (slicer.util.arrayFromVolume(node).copy(), slicer.util.arrayFromVTKMatrix(ijk_matrix(node)).copy(),
            node.GetStorageNodeID(), node.GetTransformNodeID(), node.GetName())


def assert_unchanged(node, before: tuple) -> None:
    after = snapshot(node)
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[1], before[1])
    assert after[2:] == before[2:]


def ijk_matrix(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def segment_centroid_ras(segmentation_node, index: int) -> np.ndarray:
    """Centre (RAS mm) of the voxels of the index-th segment's binary labelmap."""
    from vtk.util.numpy_support import vtk_to_numpy

    segment = segmentation_node.GetSegmentation().GetNthSegment(index)
    image = segment.GetRepresentation("Binary labelmap")
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    k, j, i = np.nonzero(values == segment.GetLabelValue())
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)], axis=-1).astype(float)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return (ijk @ slicer.util.arrayFromVTKMatrix(matrix).T)[:, :3].mean(axis=0)


def temp_dirs() -> set[str]:
    from DinoRegistrationLib.logic import workRoot

    return {p.name for p in Path(workRoot()).glob("run-*")}


# ---------------------------------------------------------------------------------------------- stand-in engine

FAKE_CLI = '''
"""Stand-in engine for tests of the Slicer logic: FAKE_ENGINE_MODE = slow | crash."""
import json, os, sys, time

def main():
    mode = os.environ.get("FAKE_ENGINE_MODE", "slow")
    print(json.dumps({"event": "progress", "stage": "features", "fraction": 0.25, "seconds_left": 30.0}), flush=True)
    if mode == "crash":
        print("Traceback (most recent call last):\\nSegmentationFault: simulated crash in the engine", file=sys.stderr)
        os._exit(3)
    time.sleep(120)

main()
'''


@pytest.fixture(autouse=True)
def private_temp_folder(tmp_path, monkeypatch):
    """Each test gets its own temporary folder, so checks that the logic cleaned up its work folder
    are not confused by tests running in parallel."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    """A logic whose engine is the stand-in above; returns (logic, set_mode)."""
    package = tmp_path / "fake" / "dinoreg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent(FAKE_CLI))
    logic = DinoRegistrationLogic(pythonExecutable=sys.executable, engineDirectory=str(package.parent))
    return logic, lambda mode: monkeypatch.setenv("FAKE_ENGINE_MODE", mode)


@pytest.fixture
def logic():
    return DinoRegistrationLogic(pythonExecutable=sys.executable, engineDirectory=str(MODULE_DIR))


@pytest.fixture(scope="module")
def affine_run():
    """One real deformable registration (MIND + ConvexAdam, fast preset) of the test pair, shared by the
    checks below."""
    scene = new_scene()
    fixed, moving = add_pair(scene)
    before_ids, before_moving = node_ids(scene), snapshot(moving)
    before_fixed = snapshot(fixed)
    logic = DinoRegistrationLogic(pythonExecutable=sys.executable, engineDirectory=str(MODULE_DIR))
    result = logic.register(fixed, moving, JobOptions(method="mind-zeroshot", preset="fast", device="cpu",
                                                             keepAffine=True), timeout=300)
    return dict(scene=scene, fixed=fixed, moving=moving, result=result, before_ids=before_ids,
                before_fixed=before_fixed, before_moving=before_moving, logic=logic)


# ---------------------------------------------------------------------------------------------- import cost

def test_module_imports_fast_without_torch_or_engine():
    """In Slicer, `slicer` and `vtk` are loaded already; the module itself must add < 1 s and must not
    import torch, SimpleITK or the engine beyond its light modules (progress protocol, requirements,
    errors): anything else is blocked here, so importing it would fail the import."""
    script = textwrap.dedent(f"""
        import sys, time
        import slicer, vtk, numpy  # present in every Slicer session before modules load
        LIGHT = ("dinoreg", "dinoreg.progress", "dinoreg.errors",
                 "dinoreg.requirements", "dinoreg.io.landmarks", "dinoreg.io.output_files")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "SimpleITK", "transformers", "monai", "scipy") or (
                        name.startswith("dinoreg") and name not in LIGHT):
                    raise ImportError("blocked by test: " + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(MODULE_DIR)!r})
        start = time.perf_counter()
        import DinoRegistration
        seconds = time.perf_counter() - start
        assert DinoRegistration.DinoRegistrationLogic is not None
        print(seconds)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0


# ---------------------------------------------------------------------------------------------- real engine

def test_registration_adds_complete_result_and_leaves_inputs_untouched(affine_run):
    scene, fixed, moving, result = affine_run["scene"], affine_run["fixed"], affine_run["moving"], affine_run["result"]
    assert_unchanged(fixed, affine_run["before_fixed"])
    assert_unchanged(moving, affine_run["before_moving"])
    assert moving.GetTransformNodeID() is None  # the moving volume is not transformed; the warped one is shown
    assert set(affine_run["before_ids"]) <= set(node_ids(scene))
    assert not any(name.startswith("DinoRegistration temporary") for name in
                   (scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())))

    warped = result.warpedVolume
    assert warped.GetName() == "moving warped" and warped.IsA("vtkMRMLScalarVolumeNode")
    assert warped.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    assert np.allclose(slicer.util.arrayFromVTKMatrix(ijk_matrix(warped)), slicer.util.arrayFromVTKMatrix(ijk_matrix(fixed)),
                       atol=1e-4)
    assert warped.GetStorageNodeID() is None  # no storage node pointing into the removed temporary folder

    assert result.transform.GetName() == "moving to fixed" and not result.transform.IsLinear()
    assert result.transform.GetAttribute("DinoRegistration.Method") == "mind-zeroshot"
    assert result.inverseTransform is not None and result.inverseTransform.GetName() == "fixed to moving"
    assert result.jacobian is not None
    assert result.report["method"] == "mind-zeroshot"
    before, after = result.report["similarity_before"]["ncc"], result.report["similarity_after"]["ncc"]
    assert after > max(before + 0.03, 0.97)
    assert result.reportNode.GetText().startswith("{")

    for heatmap in (result.heatmap, result.heatmapBefore):
        display = heatmap.GetDisplayNode()
        assert display.GetColorNode().GetName() == "DinoRegistration heat"
        assert display.GetWindowLevelMin() == 0.0 and display.GetWindowLevelMax() > 0.0
    assert result.heatmap.GetDisplayNode().GetWindowLevelMax() == result.heatmapBefore.GetDisplayNode().GetWindowLevelMax()
    assert slicer.util.arrayFromVolume(result.heatmap).mean() < slicer.util.arrayFromVolume(result.heatmapBefore).mean()


def test_transform_node_resamples_moving_like_the_warped_volume(affine_run):
    """Slicer's own resampling of the moving volume through the transform node lands on the warped volume:
    the transform is FromParent (fixed -> moving) and the LPS/RAS conversions are right."""
    scene, fixed, moving, result = affine_run["scene"], affine_run["fixed"], affine_run["moving"], affine_run["result"]
    moving.SetAndObserveTransformNodeID(result.transform.GetID())
    try:
        resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
        resampled.SetAndObserveTransformNodeID(None)  # the output inherits the transform: do not apply it twice
        ours, warped = slicer.util.arrayFromVolume(resampled), slicer.util.arrayFromVolume(result.warpedVolume)
        inner = (slice(2, -2),) * 3
        error = np.abs(ours[inner] - warped[inner])
        assert np.median(error) < 0.01 * warped.max()
        assert np.percentile(error, 95) < 0.05 * warped.max()
        # and the warp really moved something (compared with resampling without the transform)
        moving.SetAndObserveTransformNodeID(None)
        unregistered = slicer.util.arrayFromVolume(slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed))
        assert np.median(np.abs(unregistered[inner] - warped[inner])) > 5 * np.median(error)
    finally:
        moving.SetAndObserveTransformNodeID(None)


def test_transform_node_maps_points_like_the_engine_and_saves_as_itk(affine_run, tmp_path):
    """FromParent maps fixed RAS points where the engine's transform maps the same LPS points, the content
    shift is recovered, and saving the node writes an .h5 that ITK reads as a resampling transform."""
    result = affine_run["result"]
    from_parent = result.transform.GetTransformFromParent()
    points_ras = np.array([centre[:3] for centre in BLOB_CENTRES], dtype=float)  # where the image has structure
    mapped = np.array([from_parent.TransformPoint(*p) for p in points_ras])
    assert np.allclose(mapped - points_ras, SHIFT_RAS, atol=1.0)  # moving content was moved by SHIFT_RAS

    path = tmp_path / "saved.h5"
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(result.transform)
    itk = sitk.ReadTransform(str(path))
    lps = points_ras * (-1, -1, 1)
    itk_mapped = np.array([itk.TransformPoint(tuple(p)) for p in lps]) * (-1, -1, 1)
    assert np.allclose(itk_mapped, mapped, atol=0.05)  # float32 field on save
    assert "Inverse" not in open(path, "rb").read().decode("latin-1")  # not an InverseDisplacementField

    affine = result.affineTransform
    assert affine is not None and affine.IsLinear()
    affine_mapped = np.array([affine.GetTransformFromParent().TransformPoint(*p) for p in points_ras])
    assert np.allclose(affine_mapped - points_ras, SHIFT_RAS, atol=1.0)  # the affine stage found the shift


def test_comparison_views_follow_the_toggle(affine_run):
    scene, fixed, moving, result = affine_run["scene"], affine_run["fixed"], affine_run["moving"], affine_run["result"]
    from DinoRegistrationLib import scene as slicer_scene

    slicer_scene.add_slice_views(scene)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    expectations = [("fade", False, result.warpedVolume), ("fade", True, moving),
                    ("difference", False, result.heatmap), ("difference", True, result.heatmapBefore),
                    ("jacobian", False, result.jacobian)]
    for mode, before, foreground in expectations:
        affine_run["logic"].showComparison(result, mode, before=before)
        for composite in composites:
            assert composite.GetBackgroundVolumeID() == fixed.GetID()
            assert composite.GetForegroundVolumeID() == foreground.GetID()
            assert composite.GetLinkedControl()
    assert slicer_scene.color_legend(result.jacobian).GetVisibility()
    assert not slicer_scene.color_legend(result.heatmap).GetVisibility()


def test_engine_error_is_one_message_and_scene_is_unchanged(logic):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids, dirs = node_ids(scene), temp_dirs()
    with pytest.raises(RegistrationError) as error:
        logic.register(fixed, moving, JobOptions(method="no-such-method", **FAST), timeout=120)
    assert "no-such-method" in str(error.value) and "\n" not in str(error.value)
    assert node_ids(scene) == ids
    assert temp_dirs() == dirs


def test_bad_input_is_rejected_before_starting(logic):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids = node_ids(scene)
    with pytest.raises(RegistrationError, match="same node"):
        logic.startRegistration(fixed, fixed)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(RegistrationError, match="moving volume"):
        logic.startRegistration(fixed, empty)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "bend")
    grid = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(1.0)
    grid.SetDisplacementGridData(field)
    transform.SetAndObserveTransformFromParent(grid)
    moving.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(RegistrationError, match="non-linear transform"):
        logic.startRegistration(fixed, moving)
    moving.SetAndObserveTransformNodeID(None)
    scene.RemoveNode(transform)
    scene.RemoveNode(empty)
    assert node_ids(scene) == ids


def test_masks_and_segmentation_are_exported_on_their_image_grid_and_labels_come_back(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    # fixed mask: a label map on ANOTHER grid (resampled onto the fixed grid for the engine)
    mask_matrix = ijk_to_ras(np.eye(3), (3.0, 3.0, 3.0), (-30.0, -30.0, -30.0))
    mask = np.zeros((20, 20, 20), np.int16)
    mask[3:17, 3:17, 3:17] = 1
    fixed_mask = add_volume(scene, "fixed mask", mask, mask_matrix, labelmap=True)
    # moving segmentation with two named segments, from a label map on the moving grid
    moving_labels = np.zeros((24, 26, 24), np.int16)
    moving_labels[6:12, 6:14, 6:12] = 1
    moving_labels[14:20, 12:20, 12:18] = 2
    labelmap = add_volume(scene, "moving labels", moving_labels, MOVING_MATRIX, labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "anatomy")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("ventricle")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("tumour")
    scene.RemoveNode(labelmap)
    ids = node_ids(scene)

    paths = logic.exportInputs(str(tmp_path), fixed, moving, fixedMask=fixed_mask, movingSegmentation=segmentation)
    assert node_ids(scene) == ids  # temporary label maps are gone
    fixed_file, mask_file = sitk.ReadImage(paths["fixed"]), sitk.ReadImage(paths["fixedMask"])
    assert mask_file.GetSize() == fixed_file.GetSize()
    assert np.allclose(mask_file.GetDirection(), fixed_file.GetDirection()) and np.allclose(mask_file.GetOrigin(), fixed_file.GetOrigin())
    assert np.allclose(fixed_file.GetOrigin(), FIXED_MATRIX[:3, 3] * (-1, -1, 1))  # RAS -> LPS by the storage node
    labels_file = sitk.ReadImage(paths["movingLabels"])
    assert set(np.unique(sitk.GetArrayFromImage(labels_file))) == {0, 1, 2}
    assert [name for _, name, _ in paths["segmentInfo"]] == ["ventricle", "tumour"]

    kept = tmp_path / "kept"
    result = logic.register(fixed, moving, JobOptions(method="affine", outputDirectory=str(kept), **FAST),
                            fixedMask=fixed_mask, movingSegmentation=segmentation, timeout=300)
    run = Path(result.outputDirectory)  # one new subfolder per run, named after the moving volume
    assert run.parent == kept and run.name.startswith("moving ")
    assert {"transform.h5", "warped.nii.gz", "report.json", "warped_labels.nii.gz"} <= {p.name for p in run.iterdir()}
    warped = result.warpedSegmentation
    assert warped.IsA("vtkMRMLSegmentationNode") and warped.GetName() == "anatomy warped"
    names = [warped.GetSegmentation().GetNthSegment(i).GetName() for i in range(warped.GetSegmentation().GetNumberOfSegments())]
    assert names == ["ventricle", "tumour"]
    # the tumour follows the registration: it lands where the fixed image has it (moving content - SHIFT_RAS)
    moving_centroid = ras_points(MOVING_MATRIX, moving_labels.shape)[moving_labels == 2].mean(axis=0)
    assert np.allclose(segment_centroid_ras(warped, 1), moving_centroid - SHIFT_RAS, atol=1.5)
    assert result.inverseTransform is None and result.jacobian is None  # output options respected


def test_moving_volume_parent_transform_is_part_of_the_exported_geometry(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = np.eye(4)
    matrix[:3, 3] = (5.0, 0.0, -3.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    moving.SetAndObserveTransformNodeID(transform.GetID())
    paths = logic.exportInputs(str(tmp_path), fixed, moving)
    origin_lps = np.array(sitk.ReadImage(paths["moving"]).GetOrigin())
    assert np.allclose(origin_lps * (-1, -1, 1), MOVING_MATRIX[:3, 3] + (5.0, 0.0, -3.0))
    assert moving.GetTransformNodeID() == transform.GetID()


# ---------------------------------------------------------------------------------------------- process handling

def test_cancel_stops_the_engine_promptly_and_leaves_nothing(fake_engine):
    logic, set_mode = fake_engine
    set_mode("slow")
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids, dirs, before = node_ids(scene), temp_dirs(), snapshot(moving)
    progress, finished = [], []
    job = logic.startRegistration(fixed, moving, JobOptions(method="dino-zeroshot"),
                                  onProgress=lambda j: progress.append((j.stage, j.fraction, j.secondsLeft)),
                                  onFinished=finished.append)
    assert temp_dirs() - dirs  # the exported inputs exist while it runs
    deadline = time.monotonic() + 30
    while not progress and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert progress == [("features", 0.25, 30.0)]
    assert formatSeconds(job.secondsLeft) == "30 s"
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 0.5  # returns at once: the panel's main thread never waits
    assert job.state == "cancelled" and finished == [job]
    assert job.wait(10)  # polled, as the panel's timer does: the engine stops and the work folder goes
    assert job.process.process.poll() is not None  # the engine process is gone
    assert node_ids(scene) == ids and temp_dirs() == dirs
    assert_unchanged(moving, before)


def test_cancel_stops_the_real_engine_mid_run(logic):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids, dirs = node_ids(scene), temp_dirs()
    job = logic.startRegistration(fixed, moving, JobOptions(method="mind-zeroshot", device="cpu"))
    deadline = time.monotonic() + 60
    while job.stage == "starting" and not job.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "running" and job.stage != "starting"  # the engine is working
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 0.5
    assert job.wait(10) and job.process.process.poll() is not None
    assert job.state == "cancelled" and node_ids(scene) == ids and temp_dirs() == dirs


def test_engine_crash_gives_a_clear_error_with_details_in_the_log(fake_engine):
    logic, set_mode = fake_engine
    set_mode("crash")
    scene = new_scene()
    fixed, moving = add_pair(scene)
    ids, dirs = node_ids(scene), temp_dirs()
    job = logic.startRegistration(fixed, moving)
    assert job.wait(60)
    assert job.state == "failed"
    assert "stopped unexpectedly (exit code 3)" in job.message
    assert "simulated crash" in job.details
    assert node_ids(scene) == ids and temp_dirs() == dirs
    assert "package 'torch'" in unexpectedExitMessage(1, "ModuleNotFoundError: No module named 'torch'")


def test_incomplete_result_adds_nothing(logic, tmp_path):
    scene = new_scene()
    fixed, moving = add_pair(scene)
    outdir = tmp_path / "result"
    outdir.mkdir()
    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    sitk.WriteImage(image, str(outdir / "warped.nii.gz"))
    sitk.WriteImage(image, str(outdir / "heatmap.nii.gz"))
    sitk.WriteImage(image, str(outdir / "heatmap_before.nii.gz"))
    (outdir / "transform.h5").write_bytes(b"not a transform")
    ids = node_ids(scene)
    with pytest.raises(Exception, match="transform"):
        logic.loadResults(str(outdir), {"fixed": fixed, "moving": moving}, JobOptions())
    assert node_ids(scene) == ids


def test_registration_command_line_follows_the_options(logic):
    options = JobOptions(method="dino-mind", preset="fast", device="cuda", params={"iterations": "50"},
                                  affineStage=False, computeInverse=False, computeJacobian=True)
    args = logic.registrationArguments("f.nrrd", "m.nrrd", "out", options, fixedMaskPath="fm.nrrd")
    assert args[:5] == ["register", "f.nrrd", "m.nrrd", "-o", "out"]
    joined = " ".join(args)
    for expected in ("--method dino-mind", "--device cuda", "--progress-json", "--preset fast",
                     "--param iterations=50", "--no-affine", "--no-inverse", "--fixed-mask fm.nrrd"):
        assert expected in joined
    assert "--no-jacobian" not in joined and "--moving-mask" not in joined
    assert logic.engineCommand("methods")[:3] == [sys.executable, "-m", "dinoreg"]
    assert logic.engineEnvironment()["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR)
    # the background engine shares the CPU with Slicer: passive OpenMP waits, which the CLI then keeps
    assert logic.engineEnvironment()["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def test_environment_probe_and_method_list_run_in_the_background(logic):
    probe, methods = logic.startProbe(), logic.startMethodsQuery()
    assert probe.wait(60) and methods.wait(120)
    info = DinoRegistrationLogic.parseJsonOutput(probe)
    assert info["torch"] and "torch" not in info["missing"] and info["cuda"] == []
    listed = DinoRegistrationLogic.parseJsonOutput(methods)
    by_name = {m["name"]: m for m in listed}
    assert {"identity", "affine"} <= set(by_name) and by_name["affine"]["available"]
    assert all(m["available"] or m["reason"] for m in listed)
    assert method_list.methodParameterKey({"parameters": {"alpha": 1.0}}, "regularisation") == "alpha"
    # the panel's Inverse-consistent check box reaches the zero-shot methods' parameter, and only theirs
    assert method_list.methodParameterKey(by_name["mind-zeroshot"], "inverseConsistent") == "inverse_consistent"
    assert method_list.methodParameterKey(by_name["affine"], "inverseConsistent") is None
    dino = by_name.get("dino-zeroshot")
    if dino is not None and not dino["available"] and "weights download" in dino["reason"]:
        assert method_list.weightsNameFromReason(dino["reason"])  # the panel's download button knows what to fetch
    assert method_list.weightsNameFromReason("not downloaded: fetch it with: dinoreg weights download dinov2_vits14_reg") \
        == "dinov2_vits14_reg"


def test_weights_download_failure_is_reported_in_one_line(logic):
    process = logic.startWeightsDownload("no-such-model")
    assert process.wait(60) and process.returncode == 2
    message = DinoRegistrationLogic.lastErrorLine(process)
    assert "no-such-model" in message and not message.startswith("error")


def test_a_mask_with_the_image_world_geometry_under_another_parent_is_not_moved_twice(logic, tmp_path):
    """The mask sits under a shift T and its IJK-to-RAS is the image's moved by T^-1: in the world it covers the
    image's voxels exactly (same-geometry case), but its own matrix differs from the image's. The written mask
    must have the image's world geometry (it was written with the mask's matrix and the image's parent)."""
    scene = new_scene()
    fixed, moving = add_pair(scene)
    shift = np.eye(4)
    shift[:3, 3] = (7.0, -4.0, 2.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mask shift")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    shape = fixed.GetImageData().GetDimensions()[::-1]
    array = np.zeros(shape, np.int16)
    array[5:10, 6:12, 7:14] = 1
    mask = add_volume(scene, "mask", array, np.linalg.inv(shift) @ FIXED_MATRIX, labelmap=True)
    mask.SetAndObserveTransformNodeID(transform.GetID())
    paths = logic.exportInputs(str(tmp_path), fixed, moving, fixedMask=mask)
    written, image = sitk.ReadImage(paths["fixedMask"]), sitk.ReadImage(paths["fixed"])
    assert np.allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(written), array)


def test_work_folders_left_by_a_closed_slicer_are_removed_and_nothing_else(tmp_path, monkeypatch):
    """Slicer closed mid-run leaves exported patient images: the next run removes work folders of processes
    that no longer run (only 'run-<pid>-*' folders in our subfolder), and keeps live ones and foreign files."""
    from DinoRegistrationLib import logic as logic_module

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    root = Path(logic_module.workRoot())
    assert root == tmp_path / "DinoRegistration"  # Slicer's temporary folder, not the system's
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f"run-{dead.pid}-abc123"
    (stale / "inputs").mkdir(parents=True)
    (stale / "inputs" / "fixed.nrrd").write_bytes(b"patient")
    live = root / f"run-{os.getppid()}-def456"
    live.mkdir()
    foreign = root / "notes-1-x"
    foreign.mkdir()
    fresh = logic_module.newWorkDirectory()
    assert not stale.exists() and live.exists() and foreign.exists()
    assert Path(fresh).parent == root and Path(fresh).name.startswith(f"run-{os.getpid()}-")


def test_application_exit_stops_the_engine_and_removes_the_exported_images(fake_engine):
    """Issue 15: Slicer closed mid-run left the exported patient images in the temporary folder until the next run.
    On QCoreApplication::aboutToQuit (connected by the module) the running engines are killed and their work
    folders deleted at once: nothing polls after that."""
    from DinoRegistrationLib.logic import RUNNING, connectApplicationExit

    logic, set_mode = fake_engine
    set_mode("slow")
    scene = new_scene()
    fixed, moving = add_pair(scene)
    job = logic.startRegistration(fixed, moving, JobOptions(method="affine"))
    assert Path(job.workDir).is_dir() and any(Path(job.workDir).glob("*.nrrd"))  # the exported images
    assert job.workDir in RUNNING

    class App:  # slicer.app as far as the hook uses it (PythonQt: connect(signal, callable))
        slots: dict = {}

        def connect(self, signal, slot):
            self.slots[signal] = slot

    app = App()
    assert connectApplicationExit(app) and "aboutToQuit()" in app.slots
    app.slots["aboutToQuit()"]()  # Slicer quits
    assert not Path(job.workDir).exists() and job.workDir not in RUNNING
    assert job.process.process.poll() is not None  # the engine is gone, not left running on the deleted folder
    assert temp_dirs() == set()

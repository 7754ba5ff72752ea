"""``dinoreg register --scene out.mrb``: the Slicer scene bundle, read back with Slicer's own MRML libraries.

Skipped when the ``slicer-core`` package is not installed (except the check of the error message a
user gets without it).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
sys.path.insert(0, str(MODULE_DIR))


def write_blob_image(path: Path, centre_mm, direction) -> Path:
    """A smooth image (two Gaussian blobs, LPS mm) on a 20x22x18 grid, 2.5 mm, oblique direction."""
    image = sitk.Image(20, 22, 18, sitk.sitkFloat32)
    image.SetSpacing((2.5, 2.5, 2.5))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    image.SetOrigin(tuple(-np.asarray(direction) @ (np.array([19, 21, 17]) * 2.5 / 2)))
    index = np.stack(np.meshgrid(np.arange(18), np.arange(22), np.arange(20), indexing="ij")[::-1], -1)
    points = index * 2.5 @ np.asarray(direction).T + image.GetOrigin()
    value = 800 * np.exp(-((points - centre_mm) ** 2).sum(-1) / 60.0)
    value += 400 * np.exp(-((points - np.asarray(centre_mm) - (8, -6, 4)) ** 2).sum(-1) / 40.0)
    array_image = sitk.GetImageFromArray(value.astype(np.float32))
    array_image.CopyInformation(image)
    sitk.WriteImage(array_image, str(path))
    return path


def rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Run the real command line with --scene once (affine method: fast)."""
    pytest.importorskip("slicer")
    folder = tmp_path_factory.mktemp("scene")
    fixed = write_blob_image(folder / "fixed.nii.gz", (0.0, 0.0, 0.0), rotation_z(15))
    moving = write_blob_image(folder / "moving.nii.gz", (3.0, -2.0, 2.0), rotation_z(-10))
    mrb = folder / "result.mrb"
    command = [sys.executable, "-m", "dinoreg", "register", str(fixed), str(moving), "-o",
               str(folder / "out"), "--method", "affine", "--device", "cpu", "--quiet", "--scene", str(mrb)]
    done = subprocess.run(command, cwd=MODULE_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(folder=folder, fixed=fixed, moving=moving, mrb=mrb, outdir=folder / "out")


def nodes_by_name(scene) -> dict:
    return {scene.GetNthNode(i).GetName(): scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())}


def test_bundle_holds_the_complete_result(bundle):
    from DinoRegistrationLib.scene import read_bundle

    scene = read_bundle(bundle["mrb"])
    nodes = nodes_by_name(scene)
    for name in ("fixed", "moving", "moving warped", "moving to fixed", "fixed to moving",
                 "moving difference after", "moving difference before", "moving Jacobian"):
        assert name in nodes, f"{name} missing from the bundle: {sorted(nodes)}"
    fixed, moving, warped = nodes["fixed"], nodes["moving"], nodes["moving warped"]
    for volume in (fixed, moving, warped, nodes["moving difference after"], nodes["moving Jacobian"]):
        assert volume.GetImageData() is not None and volume.GetImageData().GetNumberOfPoints() > 0
    assert moving.GetTransformNodeID() is None  # the moving image stays as it was; the warped one is shown
    assert warped.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()

    # the warped volume equals the engine's warped.nii.gz, voxel for voxel
    engine_warped = sitk.GetArrayFromImage(sitk.ReadImage(str(bundle["outdir"] / "warped.nii.gz")))
    from vtk.util.numpy_support import vtk_to_numpy

    ours = vtk_to_numpy(warped.GetImageData().GetPointData().GetScalars()).reshape(engine_warped.shape)
    assert np.allclose(ours, engine_warped)

    heat = nodes["moving difference after"].GetDisplayNode()
    assert heat.GetColorNode().GetName() == "DinoRegistration heat"
    assert heat.GetColorNode().GetNumberOfColors() == 256
    legends = [heat.GetDisplayableNode().GetNthDisplayNode(i) for i in range(heat.GetDisplayableNode().GetNumberOfDisplayNodes())]
    assert any(d is not None and d.IsA("vtkMRMLColorLegendDisplayNode") for d in legends)
    assert nodes["moving Jacobian"].GetDisplayNode().GetColorNode().GetName() == "DinoRegistration Jacobian"
    assert "moving registration report" in nodes


def test_bundle_transform_is_the_engine_transform_in_fromparent_direction(bundle):
    from DinoRegistrationLib.scene import read_bundle

    scene = read_bundle(bundle["mrb"])
    transform = nodes_by_name(scene)["moving to fixed"]
    engine = sitk.ReadTransform(str(bundle["outdir"] / "transform.h5"))
    points_lps = np.array([[0.0, 0.0, 0.0], [5.0, -4.0, 3.0], [-6.0, 2.0, -5.0]])
    expected_ras = np.array([engine.TransformPoint(tuple(p)) for p in points_lps]) * (-1, -1, 1)
    from_parent = transform.GetTransformFromParent()
    mapped_ras = np.array([from_parent.TransformPoint(*(p * (-1, -1, 1))) for p in points_lps])
    assert np.allclose(mapped_ras, expected_ras, atol=1e-3)
    assert np.allclose(expected_ras[0], (-3.0, 2.0, 2.0), atol=1.0)  # the content shift, LPS -> RAS


def test_bundle_views_show_fixed_faded_with_warped(bundle):
    from DinoRegistrationLib.scene import read_bundle

    scene = read_bundle(bundle["mrb"])
    nodes = nodes_by_name(scene)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    assert sorted(c.GetLayoutName() for c in composites) == ["Green", "Red", "Yellow"]
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == nodes["fixed"].GetID()
        assert composite.GetForegroundVolumeID() == nodes["moving warped"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
        assert composite.GetLinkedControl()
    orientations = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName():
                    scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetOrientation() for i in range(3)}
    assert orientations == {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def test_scene_export_without_slicer_core_says_how_to_get_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "slicer":
                    raise ImportError("blocked by test")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from dinoreg.errors import InputError
        from DinoRegistrationLib.scene import write_scene_bundle
        try:
            write_scene_bundle({str(tmp_path)!r}, {str(tmp_path / 'x.mrb')!r}, "f.nii.gz", "m.nii.gz")
        except InputError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install slicer-core" in out.stdout
    assert not (tmp_path / "x.mrb").exists()


def test_scene_export_of_a_folder_without_results_is_an_input_error(tmp_path):
    pytest.importorskip("slicer")
    from dinoreg.errors import InputError
    from DinoRegistrationLib.scene import write_scene_bundle

    with pytest.raises(InputError, match="warped.nii.gz"):
        write_scene_bundle(tmp_path, tmp_path / "x.mrb", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")
    assert not (tmp_path / "x.mrb").exists()

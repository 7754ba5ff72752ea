"""How results look in Slicer's slice views, checked on Slicer's real display pipeline (slicer-core).

Slice views draw a scalar volume through its display node's pipeline, which ANDs the colour table's
alpha with the threshold mask (vtkImageLogic, output 255: Slicer v5.6.0
Libs/MRML/Core/vtkMRMLScalarVolumeDisplayNode.cxx:94-99, same in v5.8.1 and main): any alpha above 0 is
drawn opaque. Graded alpha therefore hides the fixed image where it was meant to let it show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package is not slicer-core", allow_module_level=True)

import slicer.util  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "DinoRegistration"))

from DinoRegistrationLib import scene as slicer_scene  # noqa: E402


def line_volume(scene, values) -> object:
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "values")
    image = vtk.vtkImageData()
    image.SetDimensions(len(values), 1, 1)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    slicer.util.updateVolumeFromArray(node, np.array([[values]], np.float32))
    node.CreateDefaultDisplayNodes()
    return node


def drawn_rgba(node) -> np.ndarray:
    """RGBA (0-255) that slice views draw for each voxel: the output of the node's display pipeline."""
    display = node.GetDisplayNode()
    display.SetInputImageDataConnection(node.GetImageDataConnection())
    display.UpdateImageDataPipeline()
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    return vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars()).reshape(-1, 4)


def test_slice_views_draw_any_nonzero_table_alpha_opaque():
    """Why graded alpha is wrong: an entry with alpha 0.04 is drawn fully opaque."""
    scene = slicer.vtkMRMLScene()
    table = slicer_scene.color_table(scene, "graded", [(1.0, 0.5, 0.0, 0.04)] * 256)
    node = line_volume(scene, [0.0, 1.0, 2.0])
    node.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    assert (drawn_rgba(node)[:, 3] == 255).all()


@pytest.mark.parametrize("make", [slicer_scene.heat_color_node, slicer_scene.jacobian_color_node])
def test_colour_tables_use_on_off_alpha(make):
    table = make(slicer.vtkMRMLScene())
    alphas = [table.GetLookupTable().GetTableValue(i)[3] for i in range(table.GetNumberOfColors())]
    assert set(alphas) <= {0.0, 1.0} and 0.0 in alphas and 1.0 in alphas


def test_jacobian_is_transparent_near_one_and_opaque_where_volume_changes():
    scene = slicer.vtkMRMLScene()
    values = [-0.5, 0.0, 0.5, 0.95, 1.0, 1.05, 1.5, 2.5]
    node = line_volume(scene, values)
    slicer_scene.style_jacobian(scene, node)
    rgba = drawn_rgba(node)
    alpha = dict(zip(values, rgba[:, 3]))
    assert alpha[0.95] == alpha[1.0] == alpha[1.05] == 0  # the fixed image shows through (was opaque at 1.05)
    assert alpha[-0.5] == alpha[0.0] == alpha[0.5] == alpha[1.5] == alpha[2.5] == 255
    assert tuple(rgba[0, :3]) == (255, 0, 0)  # folding is red
    assert rgba[2, 2] > rgba[2, 0] and rgba[6, 0] > rgba[6, 2]  # compression blue, expansion orange


def test_heatmap_small_differences_are_transparent_large_ones_opaque():
    scene = slicer.vtkMRMLScene()
    after, before = line_volume(scene, [0.0, 0.01, 0.5, 1.0]), line_volume(scene, [0.0, 0.2, 0.6, 1.0])
    slicer_scene.style_heatmaps(scene, after, before)
    alpha = drawn_rgba(after)[:, 3]
    assert alpha[0] == alpha[1] == 0 and alpha[2] == alpha[3] == 255


class RecordingScene:
    """Stand-in scene recording calls: node factories must not be used just to ask whether a class exists."""

    def __init__(self, registered: bool) -> None:
        self.registered, self.calls = registered, []

    def IsNodeClassRegistered(self, name: str) -> bool:
        self.calls.append("IsNodeClassRegistered")
        return self.registered

    def RegisterNodeClass(self, node) -> None:
        self.calls.append("RegisterNodeClass")
        self.registered = True

    def CreateNodeByClass(self, name: str):  # a factory: the caller owns (and from Python leaks) the node
        self.calls.append("CreateNodeByClass")
        return slicer.vtkMRMLScalarVolumeNode() if self.registered else None


@pytest.mark.parametrize("registered", [True, False])
def test_checking_a_node_class_creates_no_node(registered):
    scene = RecordingScene(registered)
    assert slicer_scene.register_node_class(scene, "vtkMRMLColorLegendDisplayNode")
    assert "CreateNodeByClass" not in scene.calls


def test_results_in_a_scene_leave_no_extra_references_on_slice_nodes():
    """Slice and composite nodes made for saved scenes are held by the scene only (the factory's reference
    is released), so they are freed with the scene."""
    scene = slicer.vtkMRMLScene()
    slicer_scene.add_slice_views(scene)
    for class_name in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode"):
        node = scene.GetNthNodeByClass(0, class_name)
        scene.RemoveNode(node)
        assert node.GetReferenceCount() == 1  # only this Python variable: nothing leaked

"""Registration results as a 3D Slicer scene: shared by the Slicer module and ``dinoreg register --scene``.

Works with Slicer's MRML libraries, either inside 3D Slicer or headless through the PyPI package
``slicer-core``. Nothing here is imported by the engine itself: ``slicer`` is imported inside the
functions, so this module stays importable (and cheap) where Slicer is absent.

Frames: the scene is RAS; every file is LPS. Slicer's storage nodes convert on read and write, so
no coordinate is flipped here. ``transform.h5`` maps FIXED points to MOVING points, which is what
Slicer calls "FromParent": the storage node loads it as such, so putting the transform node on the
moving volume shows the moving image warped onto the fixed one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dinoreg.errors import InputError
from dinoreg.io.output_files import OUTPUT_FILES

HEAT_COLOR_NAME = "DinoRegistration heat"
JACOBIAN_COLOR_NAME = "DinoRegistration Jacobian"
#: Jacobian determinant shown from JACOBIAN_RANGE[0] to JACOBIAN_RANGE[1]; J <= 0 (folding) is bright red
JACOBIAN_RANGE = (-1.0, 3.0)
#: Jacobian values drawn transparent (little volume change: the fixed image shows through)
JACOBIAN_TRANSPARENT = (0.9, 1.1)
#: heat table entries below this fraction of the colour range are transparent
HEAT_TRANSPARENT_BELOW = 0.05
SLICE_VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


def import_slicer() -> Any:
    """The ``slicer`` module with MRML classes, or an ``InputError`` saying how to get it."""
    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is None or not hasattr(slicer, "vtkMRMLScene"):
        raise InputError("writing a Slicer scene needs Slicer's MRML libraries: install slicer-core "
                         "(pip install slicer-core; not the unrelated package 'slicer'), or drop --scene")
    return slicer


# ---------------------------------------------------------------------------------------------- scene bundle

def write_scene_bundle(outdir: Path, mrb_path: Path, fixed_path: str | os.PathLike,
                       moving_path: str | os.PathLike) -> None:
    """Write a Slicer scene bundle (``.mrb``) showing the results in ``outdir``.

    The scene holds the fixed and moving images (moving left untransformed), the warped moving image,
    the FIXED -> MOVING transform (Slicer FromParent; applying it to the moving volume shows the warp)
    and its inverse if present, the difference heatmaps after and before with a heat colour table and
    legend, the Jacobian map, and slice views showing fixed (background) faded with warped (foreground).
    """
    slicer = import_slicer()
    outdir, mrb_path = Path(outdir), Path(mrb_path).absolute()
    if not (outdir / OUTPUT_FILES["warped"]).is_file():
        raise InputError(f"'{outdir}' holds no registration result (warped.nii.gz missing): run 'dinoreg register' first")
    if not mrb_path.parent.is_dir():
        raise InputError(f"cannot write scene '{mrb_path}': its folder does not exist")
    scene = new_scene(slicer)
    with readable_copies([Path(fixed_path), Path(moving_path)]) as (fixed_file, moving_file):
        fixed = load_volume(scene, fixed_file, volume_name(fixed_path))
        moving = load_volume(scene, moving_file, volume_name(moving_path))
    nodes = load_registration_outputs(scene, outdir, fixed, moving)
    add_slice_views(scene)
    show_comparison(scene, fixed, nodes, mode="fade")
    center_slice_views(scene, fixed)
    write_bundle(scene, mrb_path)


def new_scene(slicer: Any) -> Any:
    """An empty MRML scene able to hold volumes, transforms, colour tables and colour legends."""
    scene = slicer.vtkMRMLScene()
    register_node_class(scene, "vtkMRMLColorLegendDisplayNode")
    return scene


def register_node_class(scene: Any, class_name: str) -> bool:
    """Make ``scene`` able to create (and read back) nodes of ``class_name`` if Slicer has it; True if it can.

    ``IsNodeClassRegistered`` asks without creating anything: ``CreateNodeByClass`` is a factory whose
    result the caller owns, and from Python it would leak one node per call.
    """
    import slicer

    if not scene.IsNodeClassRegistered(class_name) and hasattr(slicer, class_name):
        scene.RegisterNodeClass(getattr(slicer, class_name)())
    return bool(scene.IsNodeClassRegistered(class_name))


def volume_name(path: str | os.PathLike) -> str:
    """Node name of an image file: its name without folder and (double) extension."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextmanager
def readable_copies(paths: list[Path]) -> Iterator[list[Path]]:
    """Paths Slicer's volume reader can open: the files themselves, or NRRD copies made by the engine's
    reader for inputs it cannot read (DICOM folders, FreeSurfer .mgz)."""
    folder = None
    readable = []
    try:
        for path in paths:
            if path.is_file() and not path.name.lower().endswith((".mgz", ".mgh")):
                readable.append(path)
                continue
            from dinoreg.io.volumes import read_volume, write_volume

            folder = folder or Path(tempfile.mkdtemp(prefix="dinoreg-scene-"))
            copy = folder / f"{volume_name(path)}.nrrd"
            write_volume(read_volume(path), copy)
            readable.append(copy)
        yield readable
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def write_bundle(scene: Any, mrb_path: Path) -> None:
    """Save ``scene`` with all its data into one ``.mrb`` file (zip), atomically."""
    import slicer

    staging = Path(tempfile.mkdtemp(prefix=".dinoreg-mrb-", dir=mrb_path.parent))
    try:
        temporary = staging / mrb_path.name
        messages = slicer.vtkMRMLMessageCollection()
        if not scene.WriteToMRB(str(temporary), None, messages) or not temporary.is_file():
            raise InputError(f"Slicer could not write the scene bundle '{mrb_path}': {messages.GetAllMessagesAsString()}")
        os.replace(temporary, mrb_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_bundle(mrb_path: str | os.PathLike) -> Any:
    """Read a ``.mrb`` into a new headless scene (for checks and tests)."""
    slicer = import_slicer()
    scene = new_scene(slicer)
    cache = slicer.vtkCacheManager()
    cache_folder = tempfile.mkdtemp(prefix="dinoreg-cache-")
    cache.SetRemoteCacheDirectory(cache_folder)
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    scene.SetCacheManager(cache)
    messages = slicer.vtkMRMLMessageCollection()
    try:
        if not scene.ReadFromMRB(str(mrb_path), True, messages):
            raise InputError(f"Slicer could not read scene bundle '{mrb_path}': {messages.GetAllMessagesAsString()}")
    finally:
        shutil.rmtree(cache_folder, ignore_errors=True)
    return scene


# ---------------------------------------------------------------------------------------------- loading outputs

def load_registration_outputs(scene: Any, outdir: str | os.PathLike, fixed: Any, moving: Any,
                              moving_labels_name: str | None = None) -> dict[str, Any]:
    """Add the engine's outputs in ``outdir`` to ``scene``; all of them or none.

    Returns the new nodes by role: ``warped``, ``transform``, ``heatmap``, ``heatmap_before`` and, when
    their files exist, ``inverse_transform``, ``jacobian``, ``warped_labels``, ``report`` (text node).
    Nodes are named after the moving volume. Loaded nodes keep no storage node pointing into
    ``outdir`` (which may be temporary): Slicer treats them as new data and saves them with the scene.
    """
    outdir = Path(outdir)
    files = {role: outdir / name for role, name in OUTPUT_FILES.items() if (outdir / name).is_file()}
    for role in ("warped", "transform", "heatmap", "heatmap_before"):
        if role not in files:
            raise InputError(f"the registration result in '{outdir}' is incomplete: {OUTPUT_FILES[role]} is missing")
    moving_name, fixed_name = moving.GetName(), fixed.GetName()
    nodes: dict[str, Any] = {}
    with nodes_removed_on_error(scene):
        nodes["warped"] = load_volume(scene, files["warped"], f"{moving_name} warped")
        copy_window_level(moving, nodes["warped"])
        nodes["transform"] = load_transform(scene, files["transform"], f"{moving_name} to {fixed_name}")
        if "inverse_transform" in files:
            nodes["inverse_transform"] = load_transform(scene, files["inverse_transform"], f"{fixed_name} to {moving_name}")
        nodes["heatmap"] = load_volume(scene, files["heatmap"], f"{moving_name} difference after")
        nodes["heatmap_before"] = load_volume(scene, files["heatmap_before"], f"{moving_name} difference before")
        style_heatmaps(scene, nodes["heatmap"], nodes["heatmap_before"])
        if "jacobian" in files:
            nodes["jacobian"] = load_volume(scene, files["jacobian"], f"{moving_name} Jacobian")
            style_jacobian(scene, nodes["jacobian"])
        if "warped_labels" in files:
            labels_name = moving_labels_name or f"{moving_name} labels"
            nodes["warped_labels"] = load_volume(scene, files["warped_labels"], f"{labels_name} warped", labelmap=True)
        if "report" in files:
            nodes["report"] = add_text(scene, f"{moving_name} registration report", files["report"].read_text())
        describe_transform(nodes["transform"], fixed_name, moving_name, files)
    return nodes


@contextmanager
def nodes_removed_on_error(scene: Any) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block if the block raises."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException:
        remove_nodes_added_since(scene, before)
        raise


def remove_nodes_added_since(scene: Any, before: set[str]) -> None:
    """Remove the nodes of ``scene`` whose IDs are not in ``before`` (newest first)."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in reversed([n for n in added if n.GetID() not in before]):
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)


def load_volume(scene: Any, path: str | os.PathLike, name: str, labelmap: bool = False) -> Any:
    """Read an image file into a new scalar (or label map) volume node with default display."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   scene.GenerateUniqueName(name))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetSingleFile(True)
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        raise InputError(f"Slicer could not read the image '{path}'")
    node.CreateDefaultDisplayNodes()
    return node


def load_transform(scene: Any, path: str | os.PathLike, name: str) -> Any:
    """Read an ITK transform file (.h5) into a new transform node.

    The file's resampling transform (fixed -> moving points) becomes the node's FromParent transform.
    """
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", scene.GenerateUniqueName(name))
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetTransformFromParent() is None:
        scene.RemoveNode(node)
        raise InputError(f"Slicer could not read the transform '{path}'")
    return node


def add_text(scene: Any, name: str, text: str) -> Any:
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", scene.GenerateUniqueName(name))
    node.SetText(text)
    return node


def describe_transform(transform: Any, fixed_name: str, moving_name: str, files: dict[str, Path]) -> None:
    """Attributes on the transform node so users (and saved scenes) know what it is."""
    transform.SetAttribute("DinoRegistration.Fixed", fixed_name)
    transform.SetAttribute("DinoRegistration.Moving", moving_name)
    transform.SetAttribute("DinoRegistration.Direction", "FromParent: fixed points -> moving points (resampling)")
    if "report" in files:
        try:
            report = json.loads(files["report"].read_text())
        except ValueError:
            return
        if isinstance(report, dict) and report.get("method"):
            transform.SetAttribute("DinoRegistration.Method", str(report["method"]))


def copy_window_level(source: Any, target: Any) -> None:
    """Show ``target`` with the window/level of ``source`` (warped looks like moving)."""
    source_display, target_display = source.GetDisplayNode(), target.GetDisplayNode()
    if source_display is None or target_display is None or not source_display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return
    if source_display.GetAutoWindowLevel():
        return
    target_display.SetAutoWindowLevel(False)
    target_display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())


# ---------------------------------------------------------------------------------------------- colours

def heat_color_node(scene: Any) -> Any:
    """Black-red-yellow-white table; the lowest values transparent so the fixed image shows through.

    Alpha is 0 or 1 only: slice views treat colour-table alpha as on/off (any alpha > 0 is drawn
    opaque: the display pipeline ANDs it with the threshold mask, Slicer v5.6.0
    Libs/MRML/Core/vtkMRMLScalarVolumeDisplayNode.cxx:94-99); the layer's opacity does the blending.
    """
    def rgba(t: float) -> tuple[float, float, float, float]:
        alpha = 0.0 if t < HEAT_TRANSPARENT_BELOW else 1.0
        return min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2)), alpha

    return color_table(scene, HEAT_COLOR_NAME, [rgba(i / 255) for i in range(256)])


def jacobian_color_node(scene: Any) -> Any:
    """Jacobian determinant colours over ``JACOBIAN_RANGE``: folding (J <= 0) bright red, compression
    blue, expansion orange, deeper with the change; the band ``JACOBIAN_TRANSPARENT`` around J = 1 is
    transparent. Alpha is 0 or 1 only (see :func:`heat_color_node`)."""
    low, high = JACOBIAN_RANGE
    band_low, band_high = JACOBIAN_TRANSPARENT

    def rgba(j: float) -> tuple[float, float, float, float]:
        if j <= 0:
            return 1.0, 0.0, 0.0, 1.0
        if band_low <= j <= band_high:
            return 1.0, 1.0, 1.0, 0.0
        if j < 1:
            return 0.1, 0.3 + 0.7 * j, 1.0, 1.0
        return 1.0, max(0.3, 0.9 - 0.3 * (j - 1)), 0.1, 1.0

    return color_table(scene, JACOBIAN_COLOR_NAME, [rgba(low + (high - low) * i / 255) for i in range(256)])


def color_table(scene: Any, name: str, colors: list[tuple[float, float, float, float]]) -> Any:
    """The scene's colour table ``name``, created once with the given RGBA entries."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(colors))
    node.GetLookupTable().SetTableRange(0, len(colors) - 1)
    for index, (r, g, b, a) in enumerate(colors):
        node.SetColor(index, f"{index}", r, g, b, a)
    node.SetAttribute("Category", "DinoRegistration")
    return node


def style_heatmaps(scene: Any, after: Any, before: Any) -> None:
    """Heat colours on one shared scale (0 to the 99th percentile of the difference before),
    so the before/after comparison is fair; small differences are transparent."""
    upper = max(percentile(before, 99.0), percentile(after, 99.0), 1e-6)
    color = heat_color_node(scene)
    for node in (after, before):
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(color.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, upper)
        display.SetAutoThreshold(False)
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(0.05 * upper)
        display.SetUpperThreshold(1e30)
    add_color_legend(scene, after, "Difference after |fixed - warped|")
    add_color_legend(scene, before, "Difference before |fixed - moving|")


def style_jacobian(scene: Any, node: Any) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
    add_color_legend(scene, node, "Jacobian determinant (red: folding)")


def add_color_legend(scene: Any, node: Any, title: str) -> Any | None:
    """Colour legend for ``node`` in the slice views (skipped where Slicer lacks legends)."""
    if not register_node_class(scene, "vtkMRMLColorLegendDisplayNode"):
        return None
    legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode")
    legend.SetName(scene.GenerateUniqueName(f"{node.GetName()} legend"))
    legend.SetAndObservePrimaryDisplayNode(node.GetDisplayNode())
    legend.SetTitleText(title)
    legend.SetVisibility(False)  # shown when the node is the foreground layer (see show_comparison)
    node.AddAndObserveDisplayNodeID(legend.GetID())
    return legend


def color_legend(node: Any) -> Any | None:
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
            return display
    return None


def percentile(node: Any, q: float) -> float:
    """``q``-th percentile of the voxel values of a volume node (0 if empty)."""
    import numpy as np
    from vtk.util.numpy_support import vtk_to_numpy

    scalars = node.GetImageData().GetPointData().GetScalars() if node.GetImageData() else None
    if scalars is None or scalars.GetNumberOfTuples() == 0:
        return 0.0
    values = vtk_to_numpy(scalars)
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if values.size else 0.0


# ---------------------------------------------------------------------------------------------- views

def add_slice_views(scene: Any) -> None:
    """Red/Yellow/Green slice and composite nodes (as Slicer's layout makes them), for saved scenes."""
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # into the scene's default slice node
    for layout_name, orientation in SLICE_VIEWS:
        if scene.GetSingletonNode(layout_name, "vtkMRMLSliceNode") is None:
            slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # from the default node: orientation presets
            slice_node.UnRegister(None)  # the factory's reference; Python owns the node now (Slicer's own pattern)
            slice_node.SetSingletonTag(layout_name)
            slice_node.SetLayoutName(layout_name)
            slice_node.SetName(layout_name)
            slice_node.SetOrientation(orientation)
            scene.AddNode(slice_node)
        if scene.GetSingletonNode(layout_name, "vtkMRMLSliceCompositeNode") is None:
            composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
            composite.UnRegister(None)
            composite.SetSingletonTag(layout_name)
            composite.SetLayoutName(layout_name)
            composite.SetName(f"{layout_name} composite")
            scene.AddNode(composite)


def center_slice_views(scene: Any, volume: Any) -> None:
    """Centre the saved slice views on ``volume`` and fit its size (what Slicer's "reset views" does)."""
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    center = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    size = max(bounds[2 * a + 1] - bounds[2 * a] for a in range(3)) * 1.05
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        slice_node.JumpSliceByCentering(*center)
        fov = slice_node.GetFieldOfView()
        slice_node.SetFieldOfView(size, size, fov[2])


def show_comparison(scene: Any, fixed: Any, nodes: dict[str, Any], mode: str = "fade", before: bool = False,
                    moving: Any | None = None, opacity: float | None = None) -> None:
    """Set every slice view: fixed in the background and, in the foreground,

    - ``mode="fade"``: the warped moving image (or, ``before=True``, the original moving image);
    - ``mode="difference"``: the difference heatmap after (or before) registration;
    - ``mode="jacobian"``: the Jacobian determinant map.

    Views are linked so the comparison follows in every view. ``opacity`` is the foreground opacity.
    """
    if mode == "fade":
        foreground = moving if before and moving is not None else nodes.get("warped")
        default_opacity = 0.5
    elif mode == "difference":
        foreground = nodes.get("heatmap_before" if before else "heatmap")
        default_opacity = 0.8
    elif mode == "jacobian":
        foreground = nodes.get("jacobian")
        default_opacity = 0.8
    else:
        raise ValueError(f"unknown comparison mode '{mode}': use fade, difference or jacobian")
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(fixed.GetID() if fixed else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(default_opacity if opacity is None else opacity)
        composite.SetLinkedControl(True)
    for role in ("heatmap", "heatmap_before", "jacobian"):
        legend = color_legend(nodes[role]) if nodes.get(role) is not None else None
        if legend is not None:
            legend.SetVisibility(nodes[role] is foreground)

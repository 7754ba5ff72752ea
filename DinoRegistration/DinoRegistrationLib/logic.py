"""Scene <-> engine glue, GUI-free: usable inside Slicer, from Slicer's Python console, and headless
with ``slicer-core`` (the tests run it against a real MRML scene).

Frames: the scene is RAS; files written for and by the engine are LPS (Slicer's storage nodes
convert). The transform node holds the engine's FIXED -> MOVING point map as Slicer "FromParent":
applying it to the moving volume shows the moving image warped onto the fixed one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import vtk

import slicer

from DinoRegistrationLib.job import RegistrationError, RegistrationJob, JobOptions, JobResult
from DinoRegistrationLib.process import EngineProcess, defaultPythonExecutable

try:  # inside Slicer; headless (slicer-core) has no ScriptedLoadableModule
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:
    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

#: the folder holding dinoreg (and this package): the module's folder
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_MODULE = "dinoreg"
DEMO_FILES = ("MRBrainTumor1.nii.gz", "MRBrainTumor2.nii.gz")


class DinoRegistrationLogic(ScriptedLoadableModuleLogic):
    """Scene <-> engine glue.

    Typical use::

        logic = DinoRegistrationLogic()
        result = logic.register(fixedNode, movingNode, JobOptions(method="mind-zeroshot"))
        logic.showComparison(result, mode="difference")

    ``startRegistration`` is the non-blocking form used by the panel.
    """

    def __init__(self, pythonExecutable: Optional[str] = None, engineDirectory: str = MODULE_DIR) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self.engineDirectory = engineDirectory

    def getParameterNode(self) -> Any:
        """Typed parameter node (inside Slicer only)."""
        from DinoRegistrationLib.parameters import DinoRegistrationParameterNode

        return DinoRegistrationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ commands

    def engineCommand(self, *arguments: str) -> List[str]:
        """Command line running the engine's CLI with ``arguments``."""
        return [self.pythonExecutable, "-m", ENGINE_MODULE, *arguments]

    def engineEnvironment(self) -> Dict[str, str]:
        """Environment for the engine: the module folder on PYTHONPATH, unbuffered output."""
        env = dict(os.environ)
        paths = [self.engineDirectory] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        # the engine shares the CPU with Slicer: its OpenMP threads sleep at once instead of spinning
        # (spin-waiting made every small torch operation 3-30x slower beside Slicer)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env

    def startEngine(self, *arguments: str) -> EngineProcess:
        """Run ``python -m dinoreg arguments...`` in the background."""
        return EngineProcess(self.engineCommand(*arguments), self.engineEnvironment()).start()

    def startProbe(self) -> EngineProcess:
        """Background ``dinoreg devices --json``: missing or outdated packages, torch version, GPUs.
        Works without torch (the command imports it only to list GPUs)."""
        return self.startEngine("devices", "--json")

    def startMethodsQuery(self) -> EngineProcess:
        """Background ``dinoreg methods --json`` (imports torch, so it takes seconds)."""
        return self.startEngine("methods", "--json")

    def startWeightsDownload(self, name: str) -> EngineProcess:
        """Background ``dinoreg weights download NAME --progress-json`` into the engine's cache."""
        return self.startEngine("weights", "download", name, "--progress-json")

    def startModelDownload(self, name: str) -> EngineProcess:
        """Background ``dinoreg models download NAME --progress-json``: a trained or published network's weights."""
        return self.startEngine("models", "download", name, "--progress-json")

    def startWeightsClear(self) -> EngineProcess:
        """Background ``dinoreg weights clear --hub``: removes downloaded DINO weights (also from the hub cache)."""
        return self.startEngine("weights", "clear", "--hub")

    @staticmethod
    def parseJsonOutput(process: EngineProcess) -> Any:
        """The JSON document a finished ``process`` printed, or None."""
        return process.jsonOutput()

    @staticmethod
    def lastErrorLine(process: EngineProcess) -> str:
        return process.lastErrorLine()

    def registrationArguments(self, fixedPath: str, movingPath: str, outputDir: str, options: JobOptions,
                              fixedMaskPath: str = "", movingMaskPath: str = "",
                              movingLabelsPath: str = "") -> List[str]:
        """Arguments of ``dinoreg register`` for these files and options."""
        args = ["register", fixedPath, movingPath, "-o", outputDir, "--method", options.method or "auto",
                "--device", options.device or "auto", "--progress-json", "--quiet"]
        if options.preset:
            args += ["--preset", options.preset]
        for key, value in sorted(options.params.items()):
            args += ["--param", f"{key}={value}"]
        if not options.affineStage:
            args.append("--no-affine")
        if not options.computeInverse:
            args.append("--no-inverse")
        if not options.computeJacobian:
            args.append("--no-jacobian")
        for flag, path in (("--fixed-mask", fixedMaskPath), ("--moving-mask", movingMaskPath),
                           ("--moving-labels", movingLabelsPath)):
            if path:
                args += [flag, path]
        return args

    # ------------------------------------------------------------------ running

    def startRegistration(self, fixedVolume: Any, movingVolume: Any, options: Optional[JobOptions] = None,
                          fixedMask: Any = None, movingMask: Any = None, movingSegmentation: Any = None,
                          onProgress: Optional[Callable[[RegistrationJob], None]] = None,
                          onFinished: Optional[Callable[[RegistrationJob], None]] = None) -> RegistrationJob:
        """Export the inputs to a temporary folder and start the engine in the background.

        Inputs are scalar volume nodes; masks and ``movingSegmentation`` may be segmentation or label
        map nodes. Parent transforms (linear only) of every input are taken into account. The scene is
        not changed. Raises ``RegistrationError`` for unusable inputs.
        """
        options = options or JobOptions()
        self.checkInputs(fixedVolume, movingVolume, options)
        workDir = newWorkDirectory()
        try:
            paths = self.exportInputs(workDir, fixedVolume, movingVolume, fixedMask, movingMask, movingSegmentation)
            outputDir = os.path.join(workDir, "result")
            args = self.registrationArguments(paths["fixed"], paths["moving"], outputDir, options,
                                              paths.get("fixedMask", ""), paths.get("movingMask", ""),
                                              paths.get("movingLabels", ""))
            process = self.startEngine(*args)
        except BaseException:
            self.removeWorkDirectory(workDir)
            raise
        RUNNING[workDir] = process
        inputs = {"fixed": fixedVolume, "moving": movingVolume, "movingSegmentation": movingSegmentation,
                  "segmentInfo": paths.get("segmentInfo")}
        return RegistrationJob(self, process, workDir, outputDir, inputs, options, onProgress, onFinished)

    def register(self, fixedVolume: Any, movingVolume: Any, options: Optional[JobOptions] = None,
                 fixedMask: Any = None, movingMask: Any = None, movingSegmentation: Any = None,
                 timeout: Optional[float] = None) -> JobResult:
        """Blocking registration (scripts, tests): returns the result or raises ``RegistrationError``."""
        job = self.startRegistration(fixedVolume, movingVolume, options, fixedMask, movingMask, movingSegmentation)
        if not job.wait(timeout):
            job.cancel()
            job.process.cancel(graceSeconds=0)
            job.wait(10)
            raise RegistrationError(f"registration did not finish within {timeout} s and was cancelled")
        if job.state != "done":
            raise RegistrationError(job.message, job.details)
        return job.result

    @staticmethod
    def removeWorkDirectory(workDir: str) -> None:
        shutil.rmtree(workDir, ignore_errors=True)
        RUNNING.pop(workDir, None)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def checkInputs(fixedVolume: Any, movingVolume: Any, options: Optional[JobOptions] = None) -> None:
        """One-line ``RegistrationError`` for inputs that cannot be registered."""
        for role, node in (("fixed", fixedVolume), ("moving", movingVolume)):
            if node is None or node.GetImageData() is None:
                raise RegistrationError(f"Select a {role} volume that contains an image.")
            if node.GetImageData().GetNumberOfScalarComponents() != 1:
                raise RegistrationError(f"The {role} volume '{node.GetName()}' has several components per voxel "
                                        "(colour or vector image): convert it to a greyscale scalar volume first.")
        if fixedVolume is movingVolume:
            raise RegistrationError("Fixed and moving volumes are the same node: select two different volumes.")
        if options is not None:
            for role, node in (("output volume", options.outputVolume), ("output transform", options.outputTransform)):
                if node is not None and node in (fixedVolume, movingVolume):
                    raise RegistrationError(f"The {role} is an input volume: choose 'Create new' or another node.")

    def exportInputs(self, folder: str, fixedVolume: Any, movingVolume: Any, fixedMask: Any = None,
                     movingMask: Any = None, movingSegmentation: Any = None) -> Dict[str, Any]:
        """Write the inputs as NRRD files in ``folder`` (LPS, by Slicer's storage node); masks and the
        label map on the grid of their image, resampled in world coordinates (parent transforms
        included). Temporary nodes needed for that are removed again."""
        scene = fixedVolume.GetScene()
        paths: Dict[str, Any] = {}
        with temporaryNodes(scene):
            paths["fixed"] = self.writeVolume(fixedVolume, os.path.join(folder, "fixed.nrrd"))
            paths["moving"] = self.writeVolume(movingVolume, os.path.join(folder, "moving.nrrd"))
            for key, mask, image in (("fixedMask", fixedMask, fixedVolume), ("movingMask", movingMask, movingVolume)):
                if mask is not None:
                    labelmap, _ = self.labelmapOnImageGrid(mask, image)
                    paths[key] = self.writeVolume(labelmap, os.path.join(folder, f"{key}.nrrd"), worldFrom=image)
            if movingSegmentation is not None:
                labelmap, segmentInfo = self.labelmapOnImageGrid(movingSegmentation, movingVolume)
                paths["movingLabels"] = self.writeVolume(labelmap, os.path.join(folder, "movingLabels.nrrd"),
                                                         worldFrom=movingVolume)
                paths["segmentInfo"] = segmentInfo
        return paths

    @staticmethod
    def writeVolume(volume: Any, path: str, worldFrom: Any = None) -> str:
        """Write ``volume`` to ``path`` with its geometry in world coordinates.

        The IJK-to-RAS matrix written is that of ``volume``, mapped by the parent transform of
        ``worldFrom`` (default: ``volume`` itself). Only linear parent transforms are accepted.
        """
        worldFrom = worldFrom or volume
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        vtk.vtkMatrix4x4.Multiply4x4(parentToWorldMatrix(worldFrom), ijkToRas, ijkToRas)
        copy = slicer.vtkMRMLLabelMapVolumeNode() if volume.IsA("vtkMRMLLabelMapVolumeNode") \
            else slicer.vtkMRMLScalarVolumeNode()
        copy.SetIJKToRASMatrix(ijkToRas)
        copy.SetAndObserveImageData(volume.GetImageData())
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        storage.SetUseCompression(False)
        ok = storage.WriteData(copy)
        copy.SetAndObserveImageData(None)
        if not ok:
            raise RegistrationError(f"Could not write '{volume.GetName()}' to the temporary folder {os.path.dirname(path)}.")
        return path

    @staticmethod
    def labelmapOnImageGrid(node: Any, image: Any) -> Tuple[Any, Any]:
        """A label map volume on the grid of ``image`` (in the image's own frame, i.e. before the image's
        parent transform) made from a segmentation or label map node; and, for segmentations, the list of
        (label value, segment name, RGB colour) in export order.

        Both nodes' parent transforms are taken into account: the mask lands where it is shown in the views.
        (Slicer's ``ResampleVolumeToReferenceVolume`` does not do this, see ``resampleInWorld``.)
        Nodes created here are temporary: call inside ``temporaryNodes(scene)``.
        """
        scene = image.GetScene()
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentIds = vtk.vtkStringArray()
            node.GetSegmentation().GetSegmentIDs(segmentIds)
            if segmentIds.GetNumberOfValues() == 0:
                raise RegistrationError(f"The segmentation '{node.GetName()}' has no segments.")
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DinoRegistration temporary labels")
            sameFrame = node.GetParentTransformNode() is image.GetParentTransformNode()
            # with the same parent transform, export straight onto the image grid; otherwise in the
            # segmentation's own geometry, then resample in world coordinates
            reference = image if sameFrame else None
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, segmentIds, labelmap,
                                                                                       reference):
                raise RegistrationError(f"The segmentation '{node.GetName()}' could not be converted to a label map.")
            if not sameFrame:
                labelmap.SetAndObserveTransformNodeID(node.GetTransformNodeID())
                labelmap = resampleInWorld(labelmap, image)
            segmentation = node.GetSegmentation()
            info = [(index + 1, segmentation.GetSegment(segmentIds.GetValue(index)).GetName(),
                     tuple(segmentation.GetSegment(segmentIds.GetValue(index)).GetColor()))
                    for index in range(segmentIds.GetNumberOfValues())]
            return labelmap, info
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLScalarVolumeNode"):
            # the node itself only when it is written as is: same world voxels AND the image's parent transform
            # (exportInputs writes it with the image's parent; under another parent it would move twice)
            if sameGeometry(node, image) and node.GetParentTransformNode() is image.GetParentTransformNode():
                return node, None
            return resampleInWorld(node, image), None
        raise RegistrationError(f"'{node.GetName()}' is not a segmentation or label map.")

    # ------------------------------------------------------------------ outputs

    def loadResults(self, outputDir: str, inputs: Dict[str, Any], options: JobOptions) -> JobResult:
        """Add the engine's outputs to the scene of the inputs: all of them, or none if anything fails.
        Output nodes chosen in ``options`` are filled last, once everything else has loaded."""
        from DinoRegistrationLib import scene as scene_module

        fixed, moving = inputs["fixed"], inputs["moving"]
        scene = fixed.GetScene()
        if scene is None or not scene.IsNodePresent(fixed) or not scene.IsNodePresent(moving):
            raise RegistrationError("The input volumes were removed from the scene during the registration.")
        for node in (options.outputVolume, options.outputTransform):
            if node is not None and not scene.IsNodePresent(node):
                raise RegistrationError(f"The output node '{node.GetName()}' was removed from the scene during the "
                                        "registration.")
        keptIn = ""
        if options.outputDirectory:  # first: if it fails, the scene is untouched
            keptIn = copyFolder(outputDir, runFolder(options.outputDirectory, moving.GetName()))
        with temporaryNodes(scene, keep=True):
            nodes = scene_module.load_registration_outputs(scene, outputDir, fixed, moving)
            report = json.loads(nodes["report"].GetText()) if nodes.get("report") else {}
            result = JobResult(
                fixedVolume=fixed, movingVolume=moving, warpedVolume=nodes["warped"], transform=nodes["transform"],
                heatmap=nodes["heatmap"], heatmapBefore=nodes["heatmap_before"],
                inverseTransform=nodes.get("inverse_transform"), jacobian=nodes.get("jacobian"),
                reportNode=nodes.get("report"), report=report, outputDirectory=keptIn)
            if options.keepAffine and report.get("affine_matrix_lps"):
                result.affineTransform = self.addAffineTransform(scene, report["affine_matrix_lps"],
                                                                 f"{moving.GetName()} to {fixed.GetName()} affine")
            if nodes.get("warped_labels") is not None:
                result.warpedSegmentation = self.warpedSegmentationNode(
                    nodes["warped_labels"], inputs.get("movingSegmentation"), inputs.get("segmentInfo"), fixed)
        # nothing can fail below: move the new content into the nodes the user chose
        if options.outputVolume is not None:
            result.warpedVolume = moveVolumeInto(result.warpedVolume, options.outputVolume)
        if options.outputTransform is not None:
            result.transform = moveTransformInto(result.transform, options.outputTransform)
        return result

    @staticmethod
    def addAffineTransform(scene: Any, matrixLps: List[List[float]], name: str) -> Any:
        """Linear transform node from a 4x4 FIXED -> MOVING LPS matrix (set as FromParent, in RAS)."""
        flip = [-1.0, -1.0, 1.0, 1.0]
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for column in range(4):
                matrix.SetElement(row, column, flip[row] * float(matrixLps[row][column]) * flip[column])
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(name))
        node.SetMatrixTransformFromParent(matrix)
        return node

    @staticmethod
    def warpedSegmentationNode(labelmap: Any, source: Any, segmentInfo: Any, fixed: Any) -> Any:
        """Warped labels as a segmentation (if the source was one; names and colours kept) or a label map."""
        if source is None or not source.IsA("vtkMRMLSegmentationNode") or not segmentInfo:
            if source is not None and source.GetDisplayNode() is not None and labelmap.GetDisplayNode() is not None:
                labelmap.GetDisplayNode().SetAndObserveColorNodeID(source.GetDisplayNode().GetColorNodeID())
            return labelmap
        scene = labelmap.GetScene()
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                   scene.GenerateUniqueName(f"{source.GetName()} warped"))
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(fixed)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise RegistrationError("The warped labels could not be converted to a segmentation.")
        byValue = {value: (name, color) for value, name, color in segmentInfo}
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            if segment.GetLabelValue() in byValue:
                name, color = byValue[segment.GetLabelValue()]
                segment.SetName(name)
                segment.SetColor(*color)
        scene.RemoveNode(labelmap)
        return segmentationNode

    # ------------------------------------------------------------------ views

    @staticmethod
    def showComparison(result: JobResult, mode: str = "fade", before: bool = False,
                       opacity: Optional[float] = None) -> None:
        """Set the slice views to compare fixed with the result (see ``scene.show_comparison``): ``mode``
        fade (fixed vs warped; ``before=True``: vs original moving), difference (heatmap after or before)
        or jacobian."""
        from DinoRegistrationLib import scene as scene_module

        scene = result.fixedVolume.GetScene()
        scene_module.show_comparison(scene, result.fixedVolume, result.nodesByRole(), mode, before,
                                     moving=result.movingVolume, opacity=opacity)

    # ------------------------------------------------------------------ landmark check

    @staticmethod
    def landmarkCheck(fixedPoints: Any, movingPoints: Any, transform: Any, inverseTransform: Any = None) -> Dict[str, Any]:
        """Distances (mm) between corresponding points before and after registration; ``inverseTransform``: the
        result's inverse transform node (the engine's field, as the CLI uses), if any. See
        ``DinoRegistrationLib.landmarks.checkLandmarks``."""
        from DinoRegistrationLib.landmarks import checkLandmarks

        return checkLandmarks(fixedPoints, movingPoints, transform, inverseTransform)

    @staticmethod
    def recordLandmarkCheck(summary: Dict[str, Any], reportNode: Any = None, keptFolder: str = "") -> None:
        """Add a landmark check (``landmarkCheck``'s summary) to the result's report as ``"landmarks"``: in the
        report text node and, when the engine's files were kept, in that folder's report.json (our file,
        replaced whole). Distances in mm, measured in Slicer's world (RAS)."""
        entry = {**summary, "source": "Slicer panel (landmark check on the result's transform)"}
        if reportNode is not None:
            try:
                report = json.loads(reportNode.GetText() or "{}")
            except ValueError:
                report = {}
            report["landmarks"] = entry
            reportNode.SetText(json.dumps(report, indent=2, default=float))
        path = os.path.join(keptFolder, "report.json") if keptFolder else ""
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                report = json.load(file)
            report["landmarks"] = entry
            partial = path + ".partial"
            with open(partial, "w", encoding="utf-8") as file:
                json.dump(report, file, indent=2, default=float)
            os.replace(partial, path)

    @staticmethod
    def jumpToPoint(scene: Any, positionRas: Any) -> None:
        """Centre every slice view of ``scene`` on a RAS point (mm)."""
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByCentering(*[float(v) for v in positionRas])


# ---------------------------------------------------------------------------------------------- helpers

class temporaryNodes:
    """Context manager removing nodes added to ``scene`` inside the block: always, or (``keep=True``)
    only if the block raises."""

    def __init__(self, scene: Any, keep: bool = False) -> None:
        self.scene, self.keep = scene, keep

    def __enter__(self) -> "temporaryNodes":
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def __exit__(self, excType: Any, exc: Any, traceback: Any) -> None:
        if self.keep and excType is None:
            return
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in self.before]):
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)


#: work folder -> its engine process, for every registration started in this Slicer and not yet cleaned up
RUNNING: Dict[str, EngineProcess] = {}

#: seconds ``removeWorkDirectoriesNow`` waits for killed engines to end (Windows keeps open files undeletable)
EXIT_WAIT_SECONDS = 2.0


def removeWorkDirectoriesNow() -> List[str]:
    """Stop every running engine at once (SIGKILL, its process group) and delete its work folder (the exported
    patient images and partial results); returns the folders removed. For application exit and module unload:
    nothing polls after that, so the usual removal once the engine ended (``RegistrationJob``) would not happen.
    Waits at most ``EXIT_WAIT_SECONDS`` per engine for it to end, so that its open files can be deleted."""
    removed = []
    for workDir, process in list(RUNNING.items()):
        process.cancel(graceSeconds=0)
        if process.process is not None:
            try:
                process.process.wait(EXIT_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # remove what can be removed now
                pass
        shutil.rmtree(workDir, ignore_errors=True)
        RUNNING.pop(workDir, None)
        if not os.path.exists(workDir):
            removed.append(workDir)
    return removed


def connectApplicationExit(app: Any) -> bool:
    """Remove the work folders when Slicer quits (``QCoreApplication::aboutToQuit``), also for registrations
    started from the Python console without the panel. Slicer (v5.6.0 to v5.10.0,
    Base/QTCore/qSlicerCoreApplication.cxx ``onAboutToQuit``) unloads the modules on that signal, which calls the
    panel's ``cleanup()``; this covers the case without a panel. False where ``app`` has no such signal."""
    try:
        app.connect("aboutToQuit()", removeWorkDirectoriesNow)
    except (AttributeError, TypeError, ValueError):
        return False
    return True


def workRoot() -> str:
    """Folder for this module's work folders: Slicer's temporary folder (Application settings) when known,
    else the system's, in a 'DinoRegistration' subfolder (created)."""
    app = getattr(slicer, "app", None)
    base = getattr(app, "temporaryPath", "") or tempfile.gettempdir()
    root = os.path.join(base, "DinoRegistration")
    os.makedirs(root, exist_ok=True)
    return root


def processAlive(pid: int) -> bool:
    """True if a process with id ``pid`` runs (signal 0 on POSIX; OpenProcess-free check elsewhere)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def newWorkDirectory(root: Optional[str] = None) -> str:
    """A new work folder 'run-<pid>-XXXX' (exported patient images, engine outputs) under ``workRoot()``, after
    removing the work folders that Slicer processes no longer running left behind (e.g. closed mid-run):
    only folders of that naming in our own subfolder, so nothing we did not create is touched."""
    root = root or workRoot()
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "run" and parts[1].isdigit() and int(parts[1]) != os.getpid() \
                and not processAlive(int(parts[1])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=root)


def parentToWorldMatrix(node: Any) -> Any:
    """4x4 matrix from ``node``'s own RAS frame to world RAS (its parent transforms; identity if none).
    A one-line ``RegistrationError`` if a parent transform is not linear."""
    matrix = vtk.vtkMatrix4x4()
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise RegistrationError(f"'{node.GetName()}' is under a non-linear transform: harden or remove "
                                    "that transform (Data module) before registering.")
        parent.GetMatrixTransformToWorld(matrix)
    return matrix


def ijkToWorldMatrix(node: Any) -> Any:
    """4x4 matrix from voxel indices (IJK) of a volume node to world RAS mm, parent transforms included."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    vtk.vtkMatrix4x4.Multiply4x4(parentToWorldMatrix(node), matrix, matrix)
    return matrix


def sameGeometry(a: Any, b: Any, tolerance: float = 1e-4) -> bool:
    """True if volumes ``a`` and ``b`` have the same dimensions and the same voxel positions in the world
    (IJK-to-RAS matrices with their parent transforms)."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    ma, mb = ijkToWorldMatrix(a), ijkToWorldMatrix(b)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tolerance for r in range(4) for c in range(4))


def resampleInWorld(labelmap: Any, image: Any) -> Any:
    """A new temporary label map node on ``image``'s voxel grid (its IJK-to-RAS, no parent transform) holding
    ``labelmap`` resampled with nearest neighbour where both are in the world, parent transforms included.

    Written here because Slicer's ``vtkSlicerVolumesLogic::ResampleVolumeToReferenceVolume`` maps through the
    input's parent transform and back through the input's (not the reference's) inverse, so masks under a
    parent transform other than their image's land in the wrong place (Slicer v5.6.0
    Modules/Loadable/Volumes/Logic/vtkSlicerVolumesLogic.cxx:1510-1521).
    """
    imageToLabel = vtk.vtkMatrix4x4()  # image IJK -> world -> label IJK
    worldToLabel = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(ijkToWorldMatrix(labelmap), worldToLabel)
    vtk.vtkMatrix4x4.Multiply4x4(worldToLabel, ijkToWorldMatrix(image), imageToLabel)
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(labelmap.GetImageData())
    reslice.SetResliceAxes(imageToLabel)
    reslice.SetInterpolationModeToNearestNeighbor()
    reslice.SetBackgroundLevel(0)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    dimensions = image.GetImageData().GetDimensions()
    reslice.SetOutputExtent(0, dimensions[0] - 1, 0, dimensions[1] - 1, 0, dimensions[2] - 1)
    reslice.Update()
    scene = image.GetScene()
    resampled = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DinoRegistration temporary mask")
    matrix = vtk.vtkMatrix4x4()
    image.GetIJKToRASMatrix(matrix)
    resampled.SetIJKToRASMatrix(matrix)
    output = vtk.vtkImageData()
    output.DeepCopy(reslice.GetOutput())
    resampled.SetAndObserveImageData(output)
    return resampled


def moveVolumeInto(source: Any, target: Any) -> Any:
    """Put ``source``'s voxels and geometry into the existing volume ``target``; remove ``source``."""
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    target.SetIJKToRASMatrix(matrix)
    target.SetAndObserveImageData(source.GetImageData())
    target.SetAndObserveTransformNodeID(None)
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    source.GetScene().RemoveNode(source)
    return target


def moveTransformInto(source: Any, target: Any) -> Any:
    """Put ``source``'s transform (FromParent) and attributes into the existing transform node ``target``;
    remove ``source``."""
    target.SetAndObserveTransformFromParent(source.GetTransformFromParent())
    for name in source.GetAttributeNames() or ():
        target.SetAttribute(name, source.GetAttribute(name))
    source.GetScene().RemoveNode(source)
    return target


def runFolder(base: str, movingName: str, now: Optional[float] = None) -> str:
    """A new folder for one run's files inside ``base``: '<moving name> <YYYY-mm-dd HHMMSS>' (with ' 2',
    ' 3', ... if that exists), so no run overwrites another. ``base`` must be chosen by the user."""
    if not base:
        raise RegistrationError("Choose a folder for the output files (Outputs > Keep files in), or turn that off.")
    safe = "".join(c if c.isalnum() or c in "-_ ." else "_" for c in movingName).strip() or "moving"
    stamp = time.strftime("%Y-%m-%d %H%M%S", time.localtime(now))
    candidate, index = os.path.join(base, f"{safe} {stamp}"), 1
    while os.path.exists(candidate):
        index += 1
        candidate = os.path.join(base, f"{safe} {stamp} {index}")
    return candidate


def copyFolder(source: str, destination: str) -> str:
    """Copy the engine's output files into the new folder ``destination``; returns it."""
    from dinoreg.errors import InputError
    from dinoreg.app.output_policy import check_output_target  # the engine's one output rule

    try:
        check_output_target(destination, option="Keep files in")
    except InputError as error:
        raise RegistrationError(f"Could not keep the output files: {error}") from None
    try:
        os.makedirs(destination)
        for name in os.listdir(source):
            shutil.copy2(os.path.join(source, name), os.path.join(destination, name))
    except OSError as error:
        shutil.rmtree(destination, ignore_errors=True)
        raise RegistrationError(f"Could not keep the output files in '{destination}': {error.strerror or error}.") \
            from None
    return destination


def demoFiles() -> Optional[List[str]]:
    """Paths of the bundled demo pair (installed module or source tree), or None."""
    for folder in (os.path.join(MODULE_DIR, "Resources", "Demo"), os.path.join(MODULE_DIR, "..", "Resources", "Demo")):
        paths = [os.path.join(folder, name) for name in DEMO_FILES]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None

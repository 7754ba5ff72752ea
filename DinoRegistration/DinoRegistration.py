"""DINO Registration: deformable registration of 3D volumes with DINOv2 / MIND features in 3D Slicer.

Module, Widget, Logic and Test in one file (Slicer's scripted-module template). The registration
engine (``DinoRegistrationLib``, next to this file) runs in a background process (PythonSlicer running
``python -m DinoRegistrationLib.cli register ... --progress-json``), so Slicer stays responsive and a
Cancel stops it at once. The scene changes only when a result is complete.

Nothing heavy is imported here: no torch, no SimpleITK, no engine module at import or panel build.
The Logic is GUI-free: it runs headless against a real MRML scene with the ``slicer-core`` package,
where ``qt`` and ``slicer.ScriptedLoadableModule`` do not exist (their imports are guarded).

Frames: the scene is RAS; files written for and by the engine are LPS (storage nodes convert).
The transform node holds the engine's FIXED -> MOVING point map as Slicer "FromParent": applying it
to the moving volume shows the moving image warped onto the fixed one.
"""

import collections
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import vtk

import slicer

try:  # inside 3D Slicer
    import qt
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    GUI_AVAILABLE = True
except ImportError:  # headless (slicer-core): only the Logic is usable
    GUI_AVAILABLE = False
    ScriptedLoadableModuleTest = unittest.TestCase

    class ScriptedLoadableModule:  # stand-ins: only the Logic is used without Slicer's GUI
        pass

    class ScriptedLoadableModuleWidget:
        pass

    class VTKObservationMixin:
        pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent


MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
ENGINE_MODULE = "DinoRegistrationLib.cli"
#: import name -> pip requirement of the packages the engine needs (torch is installed via PyTorchUtils)
ENGINE_PACKAGES = {
    "numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK", "torch": "torch",
    "transformers": "transformers>=4.47", "safetensors": "safetensors", "huggingface_hub": "huggingface_hub",
    "matplotlib": "matplotlib", "nibabel": "nibabel", "tqdm": "tqdm",
}
#: panel setting -> method parameter names it may correspond to (the first one the method has is used)
ADVANCED_PARAMETERS = {
    "featureModel": ("model", "feature_model", "backbone", "dino_model"),
    "regularisation": ("regularisation", "regularization", "smoothness", "lambda_reg", "alpha"),
    "iterations": ("iterations", "adam_iterations", "instance_iterations", "iters"),
}
DEMO_FILES = ("MRBrainTumor1.nii.gz", "MRBrainTumor2.nii.gz")
VIEW_MODES = ("fade", "difference", "jacobian")  # order of the Compare > Show combo box

#: Run in the background to learn what this Python has: missing packages and GPUs (free memory in MiB).
PROBE_SCRIPT = r"""
import importlib.util, json, sys
names = %s
info = {"python": sys.version.split()[0], "missing": [n for n in names if importlib.util.find_spec(n) is None],
        "torch": None, "cuda": []}
try:
    import torch
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            info["cuda"].append({"index": index, "name": torch.cuda.get_device_name(index),
                                 "free_mb": free // 2**20, "total_mb": total // 2**20})
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"[:300]
print(json.dumps(info))
""" % (sorted(ENGINE_PACKAGES),)


#
# DinoRegistration
#

class DinoRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DINO Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["DinoRegistration developers"]
        self.parent.helpText = """
Deformable registration of 3D volumes (MR, CT, multi-modal) with DINOv2 foundation-model and MIND
features, zero-shot: no training needed. Pick the fixed and moving volumes, a method and press Register.
Results: the moving volume warped onto the fixed grid, a transform (apply, harden, invert or save it in
the Transforms and Data modules; it is written as an ITK .h5 displacement field that ANTs and Elastix read),
difference heatmaps before and after, and the Jacobian determinant map (folding in red).
See <a href="https://github.com/DinoRegistration/DinoRegistration">the documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on DINOv2 (Meta AI), the DINO-Reg and ConvexAdam papers, MIND-SSC features, SimpleITK and PyTorch.
"""


#
# Results and options
#

@dataclass
class RegistrationOptions:
    """What to run. ``params`` are engine method parameters (``--param key=value``)."""

    method: str = "auto"
    preset: str = ""
    device: str = "auto"  # auto | cpu | cuda
    params: Dict[str, str] = field(default_factory=dict)
    affineStage: bool = True
    computeInverse: bool = True
    computeJacobian: bool = True
    keepAffine: bool = False  # also add the affine pre-alignment as its own linear transform node
    outputDirectory: str = ""  # if set, the engine's output files are kept there (replaced if present)


@dataclass
class RegistrationResult:
    """Nodes added to the scene by one successful registration."""

    fixedVolume: Any
    movingVolume: Any
    warpedVolume: Any
    transform: Any
    heatmap: Any
    heatmapBefore: Any
    inverseTransform: Any = None
    jacobian: Any = None
    affineTransform: Any = None
    warpedSegmentation: Any = None
    reportNode: Any = None
    report: Dict[str, Any] = field(default_factory=dict)

    def nodesByRole(self) -> Dict[str, Any]:
        """Nodes keyed as in ``DinoRegistrationLib.slicer_scene`` (for the comparison views)."""
        return {"warped": self.warpedVolume, "heatmap": self.heatmap, "heatmap_before": self.heatmapBefore,
                "jacobian": self.jacobian}


class RegistrationError(RuntimeError):
    """A registration could not be started or did not finish. ``str()`` is one line for the user;
    ``details`` holds the engine's log for the Python console."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


#
# Background process
#

class EngineProcess:
    """A command running in the background: its output is read by threads and collected by ``poll()``
    from the caller's (main) thread, so Qt and MRML are only touched there.

    stdout lines that are JSON objects become events (``{"event": ...}``); everything is kept in
    ``stdoutLines``; the last 300 stderr lines are kept in ``stderrTail`` for error reports.
    """

    def __init__(self, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.command = command
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.stdoutLines: List[str] = []
        self.stderrTail: collections.deque = collections.deque(maxlen=300)
        self._lines: "queue.Queue[tuple]" = queue.Queue()
        self._threads: List[threading.Thread] = []

    def start(self) -> "EngineProcess":
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: cancel stops launcher and engine
        logging.info("DinoRegistration: running %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env, text=True, encoding="utf-8",
                                        errors="replace", bufsize=1, **kwargs)
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def poll(self) -> List[Dict[str, Any]]:
        """New events since the last call; sets ``returncode`` once the process ended and all its
        output was read."""
        if self.process is None or self.finished:
            return []
        ended = self.process.poll() is not None and not any(t.is_alive() for t in self._threads)
        events = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if name == "err":
                self.stderrTail.append(line)
                continue
            self.stdoutLines.append(line)
            event = parseEvent(line)
            if event is not None:
                events.append(event)
        if ended:
            self.returncode = self.process.returncode
        return events

    def cancel(self, graceSeconds: float = 3.0) -> None:
        """Stop the process (and its children): terminate, then kill after ``graceSeconds``."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(kill=False)
        try:
            self.process.wait(graceSeconds)
        except subprocess.TimeoutExpired:
            self._signal(kill=True)
            self.process.wait(5.0)

    def _signal(self, kill: bool) -> None:
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW)
            else:
                os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block (polling) until finished or ``timeout`` seconds passed; True if finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def log(self) -> str:
        """stderr tail (and non-event stdout) for error details."""
        other = [line for line in self.stdoutLines if parseEvent(line) is None]
        return "\n".join(list(self.stderrTail) + other[-50:])


def parseEvent(line: str) -> Optional[Dict[str, Any]]:
    """The JSON event on one line of engine output, or None."""
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def unexpectedExitMessage(code: Optional[int], log: str) -> str:
    """One line for an engine that ended without reporting an error event (crash, missing package)."""
    marker = "No module named "
    if marker in log:
        package = log.split(marker, 1)[1].split()[0].strip("'\"").split(".")[0]
        return (f"The engine needs the Python package '{package}', which is not installed: use 'Install packages' "
                "in the Advanced section.")
    return f"The registration process stopped unexpectedly (exit code {code}); the Python console shows its log."


def formatSeconds(seconds: Optional[float]) -> str:
    """'1 min 05 s' style text for a time left (empty if unknown)."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class RegistrationJob:
    """One registration running in the background.

    Call ``poll()`` regularly from the main thread (a QTimer in the widget, a loop in ``wait()``):
    it updates ``stage``, ``fraction`` (0..1) and ``secondsLeft`` and, when the engine finished,
    loads the results into the scene (all or nothing) and calls ``onFinished(job)``.
    ``state`` is "running", then "done", "failed" or "cancelled".
    """

    def __init__(self, logic: "DinoRegistrationLogic", process: EngineProcess, workDir: str, outputDir: str,
                 inputs: Dict[str, Any], options: RegistrationOptions,
                 onProgress: Optional[Callable[["RegistrationJob"], None]] = None,
                 onFinished: Optional[Callable[["RegistrationJob"], None]] = None) -> None:
        self.logic, self.process, self.workDir, self.outputDir = logic, process, workDir, outputDir
        self.inputs, self.options = inputs, options
        self.onProgress, self.onFinished = onProgress, onFinished
        self.state = "running"
        self.stage = "starting"
        self.fraction = 0.0
        self.secondsLeft: Optional[float] = None
        self.message = ""
        self.details = ""
        self.result: Optional[RegistrationResult] = None
        self.startTime = time.monotonic()
        self._doneEvent: Optional[Dict[str, Any]] = None
        self._errorEvent: Optional[Dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Process new engine output; returns True once the job is finished."""
        if self.finished:
            return True
        for event in self.process.poll():
            self._handle(event)
        if self.process.finished:
            self._complete()
        return self.finished

    def _handle(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.stage = str(event.get("stage", self.stage))
            self.fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
            left = event.get("seconds_left")
            self.secondsLeft = None if left is None else float(left)
            if self.onProgress:
                self.onProgress(self)
        elif kind == "done":
            self._doneEvent = event
        elif kind == "error":
            self._errorEvent = event

    def _complete(self) -> None:
        code = self.process.returncode
        self.details = self.process.log()
        if code == 0 and self._doneEvent is not None:
            try:
                self.result = self.logic.loadResults(self.outputDir, self.inputs, self.options)
                self.state = "done"
                self.fraction = 1.0
            except Exception as error:  # the scene was left unchanged by loadResults
                logging.exception("DinoRegistration: loading the results failed")
                self.state, self.message = "failed", f"Loading the results into the scene failed: {error}"
        elif self._errorEvent is not None:
            self.state, self.message = "failed", str(self._errorEvent.get("message", "registration failed"))
        else:
            self.state = "failed"
            self.message = unexpectedExitMessage(code, self.details)
        if self.state == "failed":
            logging.error("DinoRegistration: %s\n%s", self.message, self.details)
        self._finish()

    def cancel(self) -> None:
        """Stop the engine now; the scene is left as it was before the run."""
        if self.finished:
            return
        self.process.cancel()
        self.state, self.message = "cancelled", "Registration cancelled: the scene was not changed."
        self._finish()

    def _finish(self) -> None:
        self.logic.removeWorkDirectory(self.workDir)
        if self.onFinished:
            self.onFinished(self)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block, polling, until the job finished (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


#
# DinoRegistrationLogic
#

class DinoRegistrationLogic(ScriptedLoadableModuleLogic):
    """Scene <-> engine glue, usable without the GUI (and headless with slicer-core).

    Typical use::

        logic = DinoRegistrationLogic()
        result = logic.register(fixedNode, movingNode, RegistrationOptions(method="dino-zeroshot"))
        logic.showComparison(result, mode="difference")

    ``startRegistration`` is the non-blocking form used by the panel.
    """

    def __init__(self, pythonExecutable: Optional[str] = None, engineDirectory: str = MODULE_DIR) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self.engineDirectory = engineDirectory

    def getParameterNode(self) -> Any:
        """Typed parameter node (inside Slicer only)."""
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
        return env

    def startEngine(self, *arguments: str) -> EngineProcess:
        """Run ``python -m DinoRegistrationLib.cli arguments...`` in the background."""
        return EngineProcess(self.engineCommand(*arguments), self.engineEnvironment()).start()

    def startProbe(self) -> EngineProcess:
        """Background check of the engine's Python: missing packages, torch version, GPUs."""
        return EngineProcess([self.pythonExecutable, "-c", PROBE_SCRIPT], self.engineEnvironment()).start()

    def startMethodsQuery(self) -> EngineProcess:
        """Background ``cli methods --json`` (imports torch, so it takes seconds)."""
        return self.startEngine("methods", "--json")

    @staticmethod
    def parseJsonOutput(process: EngineProcess) -> Any:
        """The JSON document a finished ``process`` printed, or None."""
        text = "\n".join(process.stdoutLines).strip()
        start = min([i for i in (text.find("{"), text.find("[")) if i >= 0], default=-1)
        if process.returncode != 0 or start < 0:
            return None
        try:
            return json.loads(text[start:])
        except ValueError:
            return None

    def registrationArguments(self, fixedPath: str, movingPath: str, outputDir: str, options: RegistrationOptions,
                              fixedMaskPath: str = "", movingMaskPath: str = "",
                              movingLabelsPath: str = "") -> List[str]:
        """Arguments of ``cli register`` for these files and options."""
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

    def startRegistration(self, fixedVolume: Any, movingVolume: Any, options: Optional[RegistrationOptions] = None,
                          fixedMask: Any = None, movingMask: Any = None, movingSegmentation: Any = None,
                          onProgress: Optional[Callable[[RegistrationJob], None]] = None,
                          onFinished: Optional[Callable[[RegistrationJob], None]] = None) -> RegistrationJob:
        """Export the inputs to a temporary folder and start the engine in the background.

        Inputs are scalar volume nodes; masks and ``movingSegmentation`` may be segmentation or label
        map volume nodes. A parent transform of an input (linear only) is taken into account. The scene
        is not changed. Raises ``RegistrationError`` for unusable inputs.
        """
        options = options or RegistrationOptions()
        self.checkInputs(fixedVolume, movingVolume)
        workDir = tempfile.mkdtemp(prefix="DinoRegistration-")
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
        inputs = {"fixed": fixedVolume, "moving": movingVolume, "movingSegmentation": movingSegmentation,
                  "segmentInfo": paths.get("segmentInfo")}
        return RegistrationJob(self, process, workDir, outputDir, inputs, options, onProgress, onFinished)

    def register(self, fixedVolume: Any, movingVolume: Any, options: Optional[RegistrationOptions] = None,
                 fixedMask: Any = None, movingMask: Any = None, movingSegmentation: Any = None,
                 timeout: Optional[float] = None) -> RegistrationResult:
        """Blocking registration: returns the result or raises ``RegistrationError``."""
        job = self.startRegistration(fixedVolume, movingVolume, options, fixedMask, movingMask, movingSegmentation)
        if not job.wait(timeout):
            job.cancel()
            raise RegistrationError(f"registration did not finish within {timeout} s and was cancelled")
        if job.state != "done":
            raise RegistrationError(job.message, job.details)
        return job.result

    @staticmethod
    def removeWorkDirectory(workDir: str) -> None:
        shutil.rmtree(workDir, ignore_errors=True)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def checkInputs(fixedVolume: Any, movingVolume: Any) -> None:
        for role, node in (("fixed", fixedVolume), ("moving", movingVolume)):
            if node is None or node.GetImageData() is None:
                raise RegistrationError(f"Select a {role} volume that contains an image.")
            if node.GetImageData().GetNumberOfScalarComponents() != 1:
                raise RegistrationError(f"The {role} volume '{node.GetName()}' has several components per voxel "
                                        "(colour or vector image): convert it to a greyscale scalar volume first.")
        if fixedVolume is movingVolume:
            raise RegistrationError("Fixed and moving volumes are the same node: select two different volumes.")

    def exportInputs(self, folder: str, fixedVolume: Any, movingVolume: Any, fixedMask: Any = None,
                     movingMask: Any = None, movingSegmentation: Any = None) -> Dict[str, Any]:
        """Write the inputs as NRRD files in ``folder`` (LPS, by Slicer's storage node); masks and the
        label map on the grid of their image. Temporary nodes needed for that are removed again."""
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
        parent = worldFrom.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise RegistrationError(f"'{worldFrom.GetName()}' is under a non-linear transform: harden or remove "
                                        "that transform (Data module) before registering.")
            toWorld = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(toWorld)
            vtk.vtkMatrix4x4.Multiply4x4(toWorld, ijkToRas, ijkToRas)
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
    def labelmapOnImageGrid(node: Any, image: Any) -> tuple:
        """A label map volume on the grid of ``image`` made from a segmentation or label map node, and,
        for segmentations, the list of (label value, segment name, RGB colour) in export order.

        Nodes created here are temporary: call inside ``temporaryNodes(scene)``.
        """
        scene = image.GetScene()
        if node.IsA("vtkMRMLSegmentationNode"):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DinoRegistration temporary labels")
            segmentIds = vtk.vtkStringArray()
            node.GetSegmentation().GetSegmentIDs(segmentIds)
            if segmentIds.GetNumberOfValues() == 0:
                raise RegistrationError(f"The segmentation '{node.GetName()}' has no segments.")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, segmentIds, labelmap, image):
                raise RegistrationError(f"The segmentation '{node.GetName()}' could not be converted to a label map.")
            segmentation = node.GetSegmentation()
            info = [(index + 1, segmentation.GetSegment(segmentIds.GetValue(index)).GetName(),
                     tuple(segmentation.GetSegment(segmentIds.GetValue(index)).GetColor()))
                    for index in range(segmentIds.GetNumberOfValues())]
            return labelmap, info
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLScalarVolumeNode"):
            if sameGeometry(node, image):
                return node, None
            resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(node, image)
            if resampled is None:
                raise RegistrationError(f"'{node.GetName()}' could not be resampled onto '{image.GetName()}'.")
            resampled.SetAndObserveTransformNodeID(None)
            return resampled, None
        raise RegistrationError(f"'{node.GetName()}' is not a segmentation or label map.")

    # ------------------------------------------------------------------ outputs

    def loadResults(self, outputDir: str, inputs: Dict[str, Any], options: RegistrationOptions) -> RegistrationResult:
        """Add the engine's outputs to the scene of the inputs: all of them, or none if anything fails."""
        from DinoRegistrationLib import slicer_scene

        fixed, moving = inputs["fixed"], inputs["moving"]
        scene = fixed.GetScene()
        if scene is None or not scene.IsNodePresent(fixed) or not scene.IsNodePresent(moving):
            raise RegistrationError("The input volumes were removed from the scene during the registration.")
        if options.outputDirectory:
            copyFolder(outputDir, options.outputDirectory)  # first: if it fails, the scene is untouched
        with temporaryNodes(scene, keep=True):
            nodes = slicer_scene.load_registration_outputs(scene, outputDir, fixed, moving)
            report = json.loads(nodes["report"].GetText()) if nodes.get("report") else {}
            result = RegistrationResult(
                fixedVolume=fixed, movingVolume=moving, warpedVolume=nodes["warped"], transform=nodes["transform"],
                heatmap=nodes["heatmap"], heatmapBefore=nodes["heatmap_before"],
                inverseTransform=nodes.get("inverse_transform"), jacobian=nodes.get("jacobian"),
                reportNode=nodes.get("report"), report=report)
            if options.keepAffine and report.get("affine_matrix_lps"):
                result.affineTransform = self.addAffineTransform(scene, report["affine_matrix_lps"],
                                                                 f"{moving.GetName()} to {fixed.GetName()} affine")
            if nodes.get("warped_labels") is not None:
                result.warpedSegmentation = self.warpedSegmentationNode(
                    nodes["warped_labels"], inputs.get("movingSegmentation"), inputs.get("segmentInfo"), fixed)
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
    def showComparison(result: RegistrationResult, mode: str = "fade", before: bool = False,
                       opacity: Optional[float] = None) -> None:
        """Set the slice views to compare fixed with the result (see ``slicer_scene.show_comparison``):
        ``mode`` fade (fixed vs warped; ``before=True``: vs original moving), difference (heatmap after
        or before) or jacobian."""
        from DinoRegistrationLib import slicer_scene

        scene = result.fixedVolume.GetScene()
        slicer_scene.show_comparison(scene, result.fixedVolume, result.nodesByRole(), mode, before,
                                     moving=result.movingVolume, opacity=opacity)

    # ------------------------------------------------------------------ model weights

    def startWeightsDownload(self, name: str) -> EngineProcess:
        """Background ``cli weights download NAME`` into the engine's cache (JSON progress events, if the
        engine prints them, are reported like a registration's)."""
        return self.startEngine("weights", "download", name)

    def startWeightsClear(self) -> EngineProcess:
        """Background ``cli weights clear --hub``: removes downloaded DINO weights (also from the hub cache)."""
        return self.startEngine("weights", "clear", "--hub")

    @staticmethod
    def lastErrorLine(process: EngineProcess) -> str:
        """The engine's last non-empty stderr line without its 'error:' prefix (its one-line message)."""
        lines = [line.strip() for line in process.stderrTail if line.strip()]
        if not lines:
            return ""
        last = lines[-1]
        for prefix in ("dinoreg: error:", "error:"):
            if last.startswith(prefix):
                return last[len(prefix):].strip()
        return last


def defaultPythonExecutable() -> str:
    """PythonSlicer inside Slicer (a Python with Slicer's packages), else this Python."""
    if hasattr(slicer, "app"):
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
        if os.path.exists(found):
            return found
    return sys.executable


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


def sameGeometry(a: Any, b: Any, tolerance: float = 1e-4) -> bool:
    """True if volumes ``a`` and ``b`` have the same dimensions and IJK-to-RAS matrix."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tolerance for r in range(4) for c in range(4))


def copyFolder(source: str, destination: str) -> None:
    """Copy the engine's output files into ``destination`` (created; files replaced)."""
    os.makedirs(destination, exist_ok=True)
    for name in os.listdir(source):
        shutil.copy2(os.path.join(source, name), os.path.join(destination, name))


def demoFiles() -> Optional[List[str]]:
    """Paths of the bundled demo pair (installed module or source tree), or None."""
    for folder in (os.path.join(MODULE_DIR, "Resources", "Demo"), os.path.join(MODULE_DIR, "..", "Resources", "Demo")):
        paths = [os.path.join(folder, name) for name in DEMO_FILES]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None


#
# Parameter node (Slicer only)
#

if GUI_AVAILABLE:
    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode

    try:
        from slicer import vtkMRMLSegmentationNode

        MaskNode = Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    except ImportError:
        MaskNode = Union[vtkMRMLLabelMapVolumeNode, None]

    @parameterNodeWrapper
    class DinoRegistrationParameterNode:
        """The panel's state, saved with the scene.

        Inputs, method settings and output options, then the nodes of the last result (used by the
        comparison controls, also after reloading a saved scene).
        """

        fixedVolume: vtkMRMLScalarVolumeNode
        movingVolume: vtkMRMLScalarVolumeNode
        fixedMask: MaskNode
        movingMask: MaskNode
        movingSegmentation: MaskNode
        method: str = "auto"
        preset: str = ""
        device: str = "auto"
        featureModel: str = ""
        regularisation: float = 0.0  # 0: the method's default
        iterations: int = 0  # 0: the method's default
        affineStage: bool = True
        computeInverse: bool = True
        computeJacobian: bool = True
        keepAffine: bool = False
        keepOutputFiles: bool = False
        outputDirectory: str = ""
        viewMode: str = "fade"
        showBefore: bool = False
        foregroundOpacity: float = 0.5
        resultFixed: vtkMRMLScalarVolumeNode
        resultMoving: vtkMRMLScalarVolumeNode
        resultWarped: vtkMRMLScalarVolumeNode
        resultTransform: vtkMRMLTransformNode
        resultHeatmap: vtkMRMLScalarVolumeNode
        resultHeatmapBefore: vtkMRMLScalarVolumeNode
        resultJacobian: vtkMRMLScalarVolumeNode
else:
    DinoRegistrationParameterNode = None


#
# DinoRegistrationWidget
#

class DinoRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. All work is done by the Logic; this class maps widgets <-> parameter node and polls
    background processes with a QTimer."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[DinoRegistrationLogic] = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self.job: Optional[RegistrationJob] = None
        self.probe: Optional[EngineProcess] = None
        self.methodsQuery: Optional[EngineProcess] = None
        self.weightsProcess: Optional[EngineProcess] = None
        self.environment: Optional[Dict[str, Any]] = None
        self.methods: List[Dict[str, Any]] = []
        self.askedToInstall = False
        self.timer = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DinoRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DinoRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.regularisationSpinBox.specialValueText = "method default"
        self.ui.iterationsSpinBox.specialValueText = "method default"
        self.setDeviceChoices(None)
        self.setMethodChoices(self.cachedMethods())

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.featureModelComboBox.connect("currentTextChanged(QString)", self.onFeatureModelChanged)
        self.ui.outputDirectoryButton.connect("directoryChanged(QString)", self.onOutputDirectoryChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.installButton.connect("clicked(bool)", self.onInstallPackages)
        self.ui.refreshButton.connect("clicked(bool)", self.startEnvironmentChecks)
        self.ui.viewModeComboBox.connect("currentIndexChanged(int)", self.onViewModeChanged)
        self.ui.compareButton.connect("toggled(bool)", self.onViewModeChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onViewModeChanged)
        self.ui.progressBar.hide()

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)

        self.initializeParameterNode()
        self.startEnvironmentChecks()

    def cleanup(self) -> None:
        """Called when the application closes: stop background work."""
        for process in (self.probe, self.methodsQuery, self.weightsProcess):
            if process is not None:
                process.cancel()
        if self.job is not None:
            self.job.cancel()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        if self.job is not None:
            self.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode: Any) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    # ------------------------------------------------------------------ parameter node <-> widgets not bound by connectGui

    def updateGuiFromParameterNode(self, caller: Any = None, event: Any = None) -> None:
        p = self._parameterNode
        if p is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            selectData(self.ui.methodComboBox, p.method)
            self.updateMethodInfo()
            selectData(self.ui.presetComboBox, p.preset)
            selectData(self.ui.deviceComboBox, p.device)
            if self.ui.featureModelComboBox.currentText != (p.featureModel or "method default"):
                self.ui.featureModelComboBox.setCurrentText(p.featureModel or "method default")
            self.ui.outputDirectoryButton.directory = p.outputDirectory or qt.QDir.homePath()
            self.ui.viewModeComboBox.setCurrentIndex(VIEW_MODES.index(p.viewMode) if p.viewMode in VIEW_MODES else 0)
            hasResult = bool(p.resultWarped and p.resultFixed)
            self.ui.resultsCollapsibleButton.enabled = hasResult
            self.ui.jacobianUnavailableLabel.visible = hasResult and not p.resultJacobian
        finally:
            self._updatingGui = False
        self.updateRegisterButton()

    def updateRegisterButton(self) -> None:
        p = self._parameterNode
        if self.job is not None:
            self.ui.registerButton.text = "Cancel"
            self.ui.registerButton.toolTip = "Stop the registration; the scene is left unchanged."
            self.ui.registerButton.enabled = True
            return
        self.ui.registerButton.text = "Register"
        method = self.selectedMethod()
        if p is None or not p.fixedVolume or not p.movingVolume:
            self.ui.registerButton.toolTip = "Select the fixed and moving volumes."
            self.ui.registerButton.enabled = False
        elif p.fixedVolume == p.movingVolume:
            self.ui.registerButton.toolTip = "Fixed and moving must be different volumes."
            self.ui.registerButton.enabled = False
        elif method is not None and not method.get("available", True):
            self.ui.registerButton.toolTip = f"{method['name']} cannot run here: {method.get('reason', '')}"
            self.ui.registerButton.enabled = False
        else:
            self.ui.registerButton.toolTip = "Register the moving volume to the fixed volume (runs in the background)."
            self.ui.registerButton.enabled = True

    def onMethodChanged(self, index: int) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.method = self.ui.methodComboBox.itemData(index) or "auto"
        self._parameterNode.preset = ""
        self.updatePresetChoices()

    def onPresetChanged(self, index: int) -> None:
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.preset = self.ui.presetComboBox.itemData(index) or ""

    def onDeviceChanged(self, index: int) -> None:
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onFeatureModelChanged(self, text: str) -> None:
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.featureModel = "" if text in ("", "method default") else text

    def onOutputDirectoryChanged(self, directory: str) -> None:
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.outputDirectory = directory

    # ------------------------------------------------------------------ methods, devices, packages

    def cachedMethodsPath(self) -> str:
        return os.path.join(slicer.app.cachePath, "DinoRegistration", "methods.json")

    def cachedMethods(self) -> List[Dict[str, Any]]:
        try:
            with open(self.cachedMethodsPath()) as file:
                methods = json.load(file)
            return methods if isinstance(methods, list) else []
        except (OSError, ValueError):
            return []

    def startEnvironmentChecks(self) -> None:
        """Probe packages and GPUs, then list the methods: both in background processes."""
        if self.probe is None or self.probe.finished:
            self.ui.environmentLabel.text = "Checking the Python environment..."
            self.probe = self.logic.startProbe()
            self.timer.start()

    def onProbeFinished(self) -> None:
        info = DinoRegistrationLogic.parseJsonOutput(self.probe)
        if not isinstance(info, dict):
            logging.error("DinoRegistration: the environment check failed:\n%s", self.probe.log())
            self.ui.environmentLabel.text = ("Could not start the engine's Python (PythonSlicer): see the Python "
                                             "console for details.")
            self.environment = None
            return
        self.environment = info
        missing = info.get("missing", [])
        if missing:
            self.ui.environmentLabel.text = (f"Missing Python packages: {', '.join(missing)}. They are installed when "
                                             "you press Register (or use 'Install packages').")
        elif info.get("torch_error"):
            self.ui.environmentLabel.text = (f"PyTorch is installed but does not load ({info['torch_error']}). "
                                             "Reinstall it with the PyTorch Utils module.")
        else:
            gpus = ", ".join(f"{g['name']} ({g['free_mb'] / 1024:.1f} GB free)" for g in info.get("cuda", []))
            self.ui.environmentLabel.text = f"PyTorch {info.get('torch')}; GPU: {gpus or 'none (CPU only)'}."
        self.setDeviceChoices(info)
        if not missing and not info.get("torch_error"):
            self.methodsQuery = self.logic.startMethodsQuery()

    def onMethodsQueryFinished(self) -> None:
        methods = DinoRegistrationLogic.parseJsonOutput(self.methodsQuery)
        if not isinstance(methods, list):
            logging.warning("DinoRegistration: listing the methods failed:\n%s", self.methodsQuery.log())
            return
        try:
            os.makedirs(os.path.dirname(self.cachedMethodsPath()), exist_ok=True)
            with open(self.cachedMethodsPath(), "w") as file:
                json.dump(methods, file)
        except OSError:
            pass
        self.setMethodChoices(methods)

    def setMethodChoices(self, methods: List[Dict[str, Any]]) -> None:
        self.methods = methods
        self._updatingGui = True
        try:
            combo = self.ui.methodComboBox
            combo.clear()
            combo.addItem("Automatic (best available)", "auto")
            for method in methods:
                label = method["name"] if method.get("available", True) else f"{method['name']} (unavailable)"
                combo.addItem(label, method["name"])
                combo.setItemData(combo.count - 1, method.get("summary", ""), qt.Qt.ToolTipRole)
        finally:
            self._updatingGui = False
        self.updatePresetChoices()
        self.updateGuiFromParameterNode()

    def selectedMethod(self) -> Optional[Dict[str, Any]]:
        name = self._parameterNode.method if self._parameterNode else "auto"
        return next((m for m in self.methods if m.get("name") == name), None)

    def updatePresetChoices(self) -> None:
        method = self.selectedMethod()
        self._updatingGui = True
        try:
            combo = self.ui.presetComboBox
            combo.clear()
            if method is None:
                combo.addItem("default", "")
            else:
                default = method.get("default_preset", "default")
                combo.addItem(default if default == "default" else f"{default} (default)", "")
                for preset in method.get("presets", []):
                    if preset != default:
                        combo.addItem(preset, preset)
            combo.enabled = combo.count > 1
            models = self.ui.featureModelComboBox
            current = models.currentText
            models.clear()
            models.addItem("method default")
            key = methodParameterKey(method, "featureModel")
            if key:
                models.addItems([str(method["parameters"][key])])
            models.setCurrentText(current or "method default")
        finally:
            self._updatingGui = False
        self.updateGuiFromParameterNode()

    def updateMethodInfo(self) -> None:
        method = self.selectedMethod()
        self.ui.downloadWeightsButton.visible = False
        if method is None:
            self.ui.methodInfoLabel.text = ("The best available method is chosen when the registration starts."
                                            if self._parameterNode and self._parameterNode.method == "auto"
                                            else "Checking which methods can run here...")
        elif method.get("available", True):
            self.ui.methodInfoLabel.text = method.get("summary", "")
        else:
            reason = method.get("reason", "")
            self.ui.methodInfoLabel.text = f"<b>Unavailable:</b> {reason}"
            self.ui.downloadWeightsButton.visible = "weights" in reason.lower()
        for setting, widget in (("featureModel", self.ui.featureModelComboBox),
                                ("regularisation", self.ui.regularisationSpinBox),
                                ("iterations", self.ui.iterationsSpinBox)):
            key = methodParameterKey(method, setting)
            widget.enabled = key is not None
            widget.toolTip = (f"Method parameter '{key}' (default {method['parameters'][key]})" if key
                              else "Not a parameter of the selected method (choose a method, not Automatic)")

    def setDeviceChoices(self, info: Optional[Dict[str, Any]]) -> None:
        """Auto, one entry per GPU (name, free memory; only when present), CPU."""
        gpus = (info or {}).get("cuda", [])
        self._updatingGui = True
        try:
            combo = self.ui.deviceComboBox
            combo.clear()
            combo.addItem(f"Auto ({'GPU' if gpus else 'CPU'})" if info else "Auto", "auto")
            if gpus:
                gpu = gpus[0]
                combo.addItem(f"GPU: {gpu['name']} ({gpu['free_mb'] / 1024:.1f} of {gpu['total_mb'] / 1024:.1f} GB free)",
                              "cuda")
            combo.addItem("CPU", "cpu")
        finally:
            self._updatingGui = False
        if self._parameterNode is not None and self._parameterNode.device == "cuda" and not gpus and info:
            self._parameterNode.device = "auto"
        self.updateGuiFromParameterNode()

    def ensurePackages(self) -> bool:
        """Install missing engine packages after asking (once per session). True if all are present."""
        missing = (self.environment or {}).get("missing", [])
        if not missing:
            return True
        if self.askedToInstall:
            self.setStatus(f"Missing Python packages: {', '.join(missing)}. Use Advanced > Install packages.", error=True)
            return False
        self.askedToInstall = True
        if not slicer.util.confirmOkCancelDisplay(
                f"DINO Registration needs these Python packages: {', '.join(missing)}.\n\nInstall them now? "
                "PyTorch is a large download (up to a few GB) and installing may take several minutes.",
                windowTitle="DINO Registration"):
            self.setStatus("Registration needs the missing Python packages.", error=True)
            return False
        return self.installPackages(missing)

    def onInstallPackages(self) -> None:
        missing = (self.environment or {}).get("missing", []) or sorted(ENGINE_PACKAGES)
        self.installPackages(missing)

    def installPackages(self, names: List[str]) -> bool:
        """Install PyTorch through the PyTorch Utils module when present, the rest with pip."""
        dialog = slicer.util.createProgressDialog(labelText="Installing Python packages...", maximum=0)
        try:
            slicer.app.processEvents()
            if "torch" in names:
                dialog.labelText = "Installing PyTorch..."
                slicer.app.processEvents()
                installTorch()
            others = [ENGINE_PACKAGES[n] for n in names if n != "torch" and n in ENGINE_PACKAGES]
            if others:
                dialog.labelText = f"Installing {', '.join(others)}..."
                slicer.app.processEvents()
                slicer.util.pip_install(others)
        except Exception as error:
            logging.exception("DinoRegistration: installing packages failed")
            self.setStatus(f"Installing Python packages failed: {error}", error=True)
            return False
        finally:
            dialog.close()
        self.environment = None
        self.startEnvironmentChecks()
        if self.probe.wait(120):
            self.onProbeFinished()
        return bool(self.environment) and not self.environment.get("missing")

    def onDownloadWeights(self) -> None:
        method = self.selectedMethod() or {}
        name = weightsNameFromReason(method.get("reason", "")) or str((method.get("parameters") or {}).get(
            methodParameterKey(method, "featureModel") or "", ""))
        if not name:
            self.setStatus("Could not tell which weights to download: see 'dinoreg weights --help'.", error=True)
            return
        self.weightsProcess = self.logic.startWeightsDownload(name)
        self.ui.downloadWeightsButton.enabled = False
        self.setStatus(f"Downloading model weights '{name}' (once; they are kept in the cache)...")
        self.showProgress(f"downloading {name}", 0.0, None, busy=True)
        self.timer.start()

    def onClearCache(self) -> None:
        if not slicer.util.confirmOkCancelDisplay("Delete all downloaded model weights? They are downloaded "
                                                  "again when needed.", windowTitle="DINO Registration"):
            return
        process = self.logic.startWeightsClear()
        process.wait(60)
        ok = process.returncode == 0
        self.setStatus("Model weights cache cleared." if ok else "Clearing the cache failed: see the Python console.",
                       error=not ok)
        if not ok:
            logging.error("DinoRegistration: weights clear failed:\n%s", process.log())
        self.startEnvironmentChecks()

    # ------------------------------------------------------------------ running

    def onRegisterButton(self) -> None:
        if self.job is not None:
            self.job.cancel()
            return
        if not self.ensurePackages():
            return
        p = self._parameterNode
        method = self.selectedMethod()
        params = {}
        for setting, value in (("featureModel", p.featureModel), ("regularisation", p.regularisation),
                               ("iterations", p.iterations)):
            key = methodParameterKey(method, setting)
            if key and value:
                params[key] = str(value)
        options = RegistrationOptions(method=p.method or "auto", preset=p.preset, device=p.device or "auto",
                                      params=params, affineStage=p.affineStage, computeInverse=p.computeInverse,
                                      computeJacobian=p.computeJacobian, keepAffine=p.keepAffine,
                                      outputDirectory=(p.outputDirectory or self.ui.outputDirectoryButton.directory)
                                      if p.keepOutputFiles else "")
        try:
            self.job = self.logic.startRegistration(p.fixedVolume, p.movingVolume, options, p.fixedMask, p.movingMask,
                                                    p.movingSegmentation, onFinished=self.onJobFinished)
        except RegistrationError as error:
            self.setStatus(str(error), error=True)
            return
        self.setStatus("Registering...")
        self.showProgress("starting", 0.0, None)
        self.updateRegisterButton()
        self.timer.start()

    def onTimer(self) -> None:
        if self.job is not None:
            self.job.poll()
            if self.job is not None:
                self.showProgress(self.job.stage, self.job.fraction, self.job.secondsLeft)
        if self.probe is not None and not self.probe.finished:
            self.probe.poll()
            if self.probe.finished:
                self.onProbeFinished()
        if self.methodsQuery is not None and not self.methodsQuery.finished:
            self.methodsQuery.poll()
            if self.methodsQuery.finished:
                self.onMethodsQueryFinished()
        if self.weightsProcess is not None and not self.weightsProcess.finished:
            self.pollWeightsDownload()
        busy = [p for p in (self.probe, self.methodsQuery, self.weightsProcess) if p is not None and not p.finished]
        if self.job is None and not busy:
            self.timer.stop()

    def pollWeightsDownload(self) -> None:
        for event in self.weightsProcess.poll():
            if event.get("event") == "progress":
                self.showProgress(event.get("stage", "download"), float(event.get("fraction") or 0.0),
                                  event.get("seconds_left"))
        if self.weightsProcess.finished:
            self.ui.progressBar.hide()
            self.ui.downloadWeightsButton.enabled = True
            if self.weightsProcess.returncode == 0:
                self.setStatus("Model weights downloaded.")
                self.methodsQuery = self.logic.startMethodsQuery()
            else:
                logging.error("DinoRegistration: weights download failed:\n%s", self.weightsProcess.log())
                reason = DinoRegistrationLogic.lastErrorLine(self.weightsProcess) or "see the Python console"
                self.setStatus(f"Downloading weights failed: {reason}", error=True)

    def onJobFinished(self, job: RegistrationJob) -> None:
        self.job = None
        self.ui.progressBar.hide()
        self.updateRegisterButton()
        if job.state == "done":
            self.storeResult(job.result)
            report = job.result.report
            summary = f"Done in {time.monotonic() - job.startTime:.0f} s"
            before, after = report.get("similarity_before", {}), report.get("similarity_after", {})
            if "ncc" in before and "ncc" in after:
                summary += f": similarity (NCC) {before['ncc']:.3f} -> {after['ncc']:.3f}"
            folding = (report.get("jacobian") or {}).get("percent_nonpositive")
            if folding is not None:
                summary += f", folding {folding:.2f}% of voxels"
            self.setStatus(summary + ".")
            self.showResultViews()
            slicer.util.resetSliceViews()
        elif job.state == "failed":
            self.setStatus(job.message, error=True, log=False)  # the job logged it with the engine's log
            slicer.util.errorDisplay(job.message, windowTitle="DINO Registration", detailedText=job.details[-5000:])
        else:
            self.setStatus(job.message)

    def storeResult(self, result: RegistrationResult) -> None:
        p = self._parameterNode
        p.resultFixed, p.resultMoving = result.fixedVolume, result.movingVolume
        p.resultWarped, p.resultTransform = result.warpedVolume, result.transform
        p.resultHeatmap, p.resultHeatmapBefore = result.heatmap, result.heatmapBefore
        p.resultJacobian = result.jacobian
        p.viewMode, p.showBefore = "fade", False

    def lastResult(self) -> Optional[RegistrationResult]:
        p = self._parameterNode
        if p is None or not p.resultFixed or not p.resultWarped:
            return None
        return RegistrationResult(fixedVolume=p.resultFixed, movingVolume=p.resultMoving, warpedVolume=p.resultWarped,
                                  transform=p.resultTransform, heatmap=p.resultHeatmap,
                                  heatmapBefore=p.resultHeatmapBefore, jacobian=p.resultJacobian)

    def onViewModeChanged(self, *args: Any) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.viewMode = VIEW_MODES[max(0, self.ui.viewModeComboBox.currentIndex)]
        self.showResultViews()

    def showResultViews(self) -> None:
        """Apply the Compare controls (read from the widgets, which may be ahead of the parameter node)."""
        result = self.lastResult()
        if result is None:
            return
        mode = VIEW_MODES[max(0, self.ui.viewModeComboBox.currentIndex)]
        if mode == "jacobian" and not result.jacobian:
            mode = "fade"
        before = bool(self.ui.compareButton.checked)
        self.logic.showComparison(result, mode, before=before, opacity=self.ui.opacitySlider.value)
        self.ui.compareButton.text = "Showing: before registration" if before else "Showing: after registration"

    # ------------------------------------------------------------------ feedback

    def showProgress(self, stage: str, fraction: float, secondsLeft: Optional[float], busy: bool = False) -> None:
        """Progress bar with the stage name and time left; ``busy``: no fraction known (moving bar)."""
        bar = self.ui.progressBar
        bar.show()
        bar.maximum = 0 if busy else 1000
        bar.value = int(round(1000 * fraction))
        left = formatSeconds(secondsLeft)
        bar.format = f"{stage}: %p%" + (f" ({left} left)" if left else "")

    def setStatus(self, text: str, error: bool = False, log: bool = True) -> None:
        """One line under the Register button (red for errors); also logged unless ``log`` is False."""
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        if log:
            (logging.error if error else logging.info)("DinoRegistration: %s", text)


def selectData(combo: Any, data: str) -> None:
    index = combo.findData(data)
    if index >= 0 and combo.currentIndex != index:
        combo.setCurrentIndex(index)


def methodParameterKey(method: Optional[Dict[str, Any]], setting: str) -> Optional[str]:
    """Name of the method's parameter behind a panel setting, or None if the method has none."""
    parameters = (method or {}).get("parameters") or {}
    return next((key for key in ADVANCED_PARAMETERS[setting] if key in parameters), None)


def weightsNameFromReason(reason: str) -> Optional[str]:
    """The NAME in a reason such as '... run: dinoreg weights download NAME'."""
    words = reason.replace("'", " ").replace('"', " ").replace("`", " ").split()
    for index, word in enumerate(words[:-1]):
        if word == "download" and index > 0 and words[index - 1] == "weights":
            return words[index + 1].rstrip(".,;:)")
    return None


def installTorch() -> None:
    """Install PyTorch with the PyTorch Utils module (picks the CUDA build) or, without it, pip."""
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=False) is None:
            raise RuntimeError("PyTorch could not be installed: see the Python console")
    else:
        slicer.util.pip_install("torch")


#
# DinoRegistrationTest
#

class DinoRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload and Test): registers the bundled demo pair."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_AffineRegistration()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_BadInputReportsError()

    def loadDemoPair(self) -> tuple:
        paths = demoFiles()
        if paths:
            return tuple(slicer.util.loadVolume(p) for p in paths)
        import SampleData

        return SampleData.downloadSample("MRBrainTumor1"), SampleData.downloadSample("MRBrainTumor2")

    def test_AffineRegistration(self) -> None:
        self.delayDisplay("Registering the demo pair (affine method)")
        fixed, moving = self.loadDemoPair()
        logic = DinoRegistrationLogic()
        result = logic.register(fixed, moving, RegistrationOptions(method="affine", device="cpu"), timeout=600)
        self.assertEqual(result.warpedVolume.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertIsNotNone(result.transform.GetTransformFromParent())
        self.assertGreater(result.report["similarity_after"]["ncc"], result.report["similarity_before"]["ncc"])
        logic.showComparison(result, "difference")
        self.delayDisplay("Affine registration passed")

    def test_CancelLeavesSceneUnchanged(self) -> None:
        fixed, moving = self.loadDemoPair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = DinoRegistrationLogic().startRegistration(fixed, moving, RegistrationOptions(method="affine"))
        time.sleep(0.5)
        job.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel passed")

    def test_BadInputReportsError(self) -> None:
        fixed, moving = self.loadDemoPair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RegistrationError) as context:
            DinoRegistrationLogic().register(fixed, moving, RegistrationOptions(method="no-such-method"), timeout=120)
        self.assertIn("no-such-method", str(context.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Error reporting passed")

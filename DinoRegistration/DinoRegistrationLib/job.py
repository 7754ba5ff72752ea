"""One registration running in the background: what to run, what came out, and the job polling it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from DinoRegistrationLib.process import EngineProcess, unexpectedExitMessage

if TYPE_CHECKING:
    from DinoRegistrationLib.logic import DinoRegistrationLogic


@dataclass
class JobOptions:
    """What to run and where the results go. ``params`` are engine method parameters (``--param key=value``).

    ``outputVolume`` / ``outputTransform``: existing nodes to fill with the warped volume and the
    transform (None: new nodes named after the moving volume). ``outputDirectory``: a folder in which
    each run's engine files are kept, in a new subfolder per run (empty: not kept).
    """

    method: str = "auto"
    preset: str = ""
    device: str = "auto"  # auto | cpu | cuda
    params: Dict[str, str] = field(default_factory=dict)
    affineStage: bool = True
    computeInverse: bool = True  # also add the fixed-to-moving transform node
    computeJacobian: bool = True
    keepAffine: bool = False  # also add the affine pre-alignment as its own linear transform node
    outputDirectory: str = ""
    outputVolume: Any = None
    outputTransform: Any = None


@dataclass
class JobResult:
    """Nodes added to (or filled in) the scene by one successful registration."""

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
    outputDirectory: str = ""  # where the engine's files were kept, if asked

    def nodesByRole(self) -> Dict[str, Any]:
        """Nodes keyed as in ``DinoRegistrationLib.scene`` (for the comparison views)."""
        return {"warped": self.warpedVolume, "heatmap": self.heatmap, "heatmap_before": self.heatmapBefore,
                "jacobian": self.jacobian}


class RegistrationError(RuntimeError):
    """A registration could not be started or did not finish. ``str()`` is one line for the user;
    ``details`` holds the engine's log for the Python console."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class RegistrationJob:
    """One registration running in the background.

    Call ``poll()`` regularly from the main thread (a QTimer in the panel, a loop in ``wait()``): it
    updates ``stage``, ``fraction`` (0..1) and ``secondsLeft`` and, when the engine finished, loads the
    results into the scene (all or nothing) and calls ``onFinished(job)``. ``state`` is "running", then
    "done", "failed" or "cancelled". ``cancel()`` returns at once; keep polling until ``cleanedUp`` so
    the engine is stopped for good and its work folder removed.
    """

    def __init__(self, logic: "DinoRegistrationLogic", process: EngineProcess, workDir: str, outputDir: str,
                 inputs: Dict[str, Any], options: JobOptions,
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
        self.result: Optional[JobResult] = None
        self.startTime = time.monotonic()
        self.cleanedUp = False
        self._doneEvent: Optional[Dict[str, Any]] = None
        self._errorEvent: Optional[Dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Process new engine output (never blocks); True once the job is finished."""
        if self.finished:
            self._cleanUpWhenStopped()
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
        """Stop the engine and return at once; the scene is left as it was before the run."""
        if self.finished:
            return
        self.process.cancel()
        self.state, self.message = "cancelled", "Registration cancelled: the scene was not changed."
        self._finish()

    def _finish(self) -> None:
        self._cleanUpWhenStopped()
        if self.onFinished:
            self.onFinished(self)

    def _cleanUpWhenStopped(self) -> None:
        """Remove the work folder once the engine process has ended (it may still write into it)."""
        if self.cleanedUp:
            return
        self.process.poll()
        if self.process.finished or self.process.process is None:
            self.logic.removeWorkDirectory(self.workDir)
            self.cleanedUp = True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block, polling, until the job finished and was cleaned up (True) or ``timeout`` seconds passed
        (False). For scripts and tests: the panel polls from its timer instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self.poll() and self.cleanedUp):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

"""DINO Registration: deformable registration of 3D volumes with DINOv2 / MIND features in 3D Slicer.

This file holds the Module, the Widget (the panel) and the self-Test. Everything else is in the
``DinoRegistrationLib`` package beside it (process handling, the job, the Logic, the installer, the
scene, the landmark check), which is GUI-free and tested headless. The registration engine
(``dinoreg``) runs in a background process, so Slicer stays responsive and Cancel stops it
at once. Nothing heavy is imported here: no torch, no SimpleITK, no engine module at import or panel build.
"""

import logging
import os
import time
import unittest
from typing import Any, Dict, List, Optional

import vtk

import slicer
from DinoRegistrationLib import methods as methodList
from DinoRegistrationLib.install import installPackages as installEnginePackages
from DinoRegistrationLib.install import PipInstall, methodFamilies, missingSummary
from DinoRegistrationLib.job import RegistrationError, RegistrationJob, JobOptions, JobResult
from DinoRegistrationLib.landmarks import formatLandmarkSummary
from DinoRegistrationLib.logic import DinoRegistrationLogic, connectApplicationExit, demoFiles, removeWorkDirectoriesNow
from DinoRegistrationLib.process import EngineProcess, formatSeconds

try:  # inside 3D Slicer
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                               ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
except ImportError:  # headless (slicer-core): the Logic is usable; the Widget only with stand-in widgets (tests)
    ScriptedLoadableModuleTest = unittest.TestCase

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

        def setup(self) -> None:
            pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self) -> None:
            pass

        def addObserver(self, *args: Any) -> None:
            pass

        def removeObserver(self, *args: Any) -> None:
            pass

        def removeObservers(self, *args: Any) -> None:
            pass

VIEW_MODES = ("fade", "difference", "jacobian")  # order of the Compare > Show combo box
TIMER_MILLISECONDS = 200


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
features, zero-shot: no training needed. Pick the fixed and moving volumes, a preset and press Register.
Results: the moving volume warped onto the fixed grid, a transform (apply, harden, invert or save it in
the Transforms and Data modules; it is written as an ITK .h5 displacement field that ANTs and Elastix read),
difference heatmaps before and after, the Jacobian determinant map (folding in red), and a landmark check.
See <a href="https://github.com/DinoRegistration/DinoRegistration">the documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on DINOv2 (Meta AI), the DINO-Reg and ConvexAdam papers, MIND-SSC features, SimpleITK and PyTorch.
"""
        # exported patient images must not outlive Slicer: engines still running at exit are stopped and their
        # work folders removed (the panel's cleanup() does it too; this covers runs started from the console)
        if getattr(slicer, "app", None) is not None:
            connectApplicationExit(slicer.app)


#
# DinoRegistrationWidget
#

class DinoRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. All work is done by the Logic; this class maps widgets <-> parameter node and polls
    background processes from one QTimer, so nothing here ever waits on the main thread."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[DinoRegistrationLogic] = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self.job: Optional[RegistrationJob] = None
        self.stoppingJobs: List[RegistrationJob] = []  # cancelled, engine still stopping
        self.probe: Optional[EngineProcess] = None
        self.methodsQuery: Optional[EngineProcess] = None
        self.weightsProcess: Optional[EngineProcess] = None
        self.clearProcess: Optional[EngineProcess] = None
        self.pipInstall: Optional[PipInstall] = None  # pip running in the background (Install packages)
        self.installDialog = None  # its progress dialog
        self.environment: Optional[Dict[str, Any]] = None
        self.methods: List[Dict[str, Any]] = []
        self.askedToInstall: set = set()  # package families ('' = core) already offered this session
        self.registerWhenReady = False  # Register was pressed while packages were being installed
        self.landmarkSummary: Optional[Dict[str, Any]] = None
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

        self.setDeviceChoices(None)
        self.setMethodChoices(self.cachedMethods())

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.featureModelComboBox.connect("currentTextChanged(QString)", self.onFeatureModelChanged)
        self.ui.outputDirectoryButton.connect("directoryChanged(QString)", self.onOutputDirectoryChanged)
        # ctkDirectoryButton emits directoryChanged only for a different folder: after Close Scene the parameter is
        # reset while the button still shows the old folder, so choosing it again must count too. directorySelected
        # (const QString&) is declared and emitted by setDirectory even for the same folder in the CTK that Slicer
        # 5.6.0, 5.8.1 and 5.10.0 build (commits f53820a4, 82cae578, dd4caeae: Libs/Widgets/ctkDirectoryButton.h)
        self.ui.outputDirectoryButton.connect("directorySelected(QString)", self.onOutputDirectoryChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.installButton.connect("clicked(bool)", self.onInstallPackages)
        self.ui.refreshButton.connect("clicked(bool)", self.startEnvironmentChecks)
        self.ui.viewModeComboBox.connect("currentIndexChanged(int)", self.onViewModeChanged)
        self.ui.compareButton.connect("toggled(bool)", self.onViewModeChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onViewModeChanged)
        self.ui.checkButton.connect("clicked(bool)", self.onCheckLandmarks)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpToPoint)
        self.ui.landmarkTable.connect("cellDoubleClicked(int,int)", self.onJumpToPoint)
        self.ui.landmarkTable.connect("itemSelectionChanged()", self.updateJumpButton)
        self.ui.progressBar.hide()
        self.ui.downloadWeightsButton.hide()
        self.ui.environmentWarningLabel.hide()

        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_MILLISECONDS)
        self.timer.connect("timeout()", self.onTimer)

        self.initializeParameterNode()
        self.startEnvironmentChecks()

    def cleanup(self) -> None:
        """Called when the module is unloaded (Slicer unloads the modules when it quits): stop background work and
        delete the work folders of running registrations (exported patient images) now; waits at most a few
        seconds for killed engines to end (``logic.EXIT_WAIT_SECONDS``)."""
        for process in (self.probe, self.methodsQuery, self.weightsProcess, self.clearProcess):
            if process is not None:
                process.cancel(graceSeconds=0)
        if self.pipInstall is not None:
            self.pipInstall.cancel()  # stops it while downloading; a started install step finishes on its own
        for job in [self.job] + self.stoppingJobs:
            if job is not None:
                job.cancel()
        removeWorkDirectoriesNow()  # nothing polls after this: stop the engines and delete the exported images now
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
        self.cancelJob()
        self.setParameterNode(None)
        self.clearLandmarkCheck()

    def clearLandmarkCheck(self) -> None:
        """Forget the landmark check: its points belong to the scene being closed."""
        self.landmarkSummary = None
        self.ui.landmarkTable.setRowCount(0)
        self.ui.landmarkSummaryLabel.text = ""
        self.updateJumpButton()

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
            selectData(self.ui.presetComboBox, p.preset)
            selectData(self.ui.deviceComboBox, p.device)
            if self.ui.featureModelComboBox.currentText != (p.featureModel or "method default"):
                self.ui.featureModelComboBox.setCurrentText(p.featureModel or "method default")
            if p.outputDirectory and self.ui.outputDirectoryButton.directory != p.outputDirectory:
                self.ui.outputDirectoryButton.directory = p.outputDirectory
            # shown instead of the button's default (current) folder until one is chosen: no silent home folder
            self.ui.outputDirectoryButton.text = p.outputDirectory or "Choose a folder..."
            self.ui.viewModeComboBox.setCurrentIndex(VIEW_MODES.index(p.viewMode) if p.viewMode in VIEW_MODES else 0)
            hasResult = bool(p.resultWarped and p.resultFixed)
            self.ui.resultsCollapsibleButton.enabled = hasResult
            self.ui.jacobianUnavailableLabel.visible = hasResult and not p.resultJacobian
        finally:
            self._updatingGui = False
        self.updateMethodInfo()
        self.updateRegisterButton()

    def registerBlocker(self) -> str:
        """Why Register cannot run now ('' if it can): shown in the status line, not only in a tooltip."""
        p = self._parameterNode
        method = self.selectedMethod()
        if p is None or not p.fixedVolume or not p.movingVolume:
            return "Select the fixed and moving volumes."
        if p.fixedVolume == p.movingVolume:
            return "Fixed and moving must be different volumes."
        if method is not None and not method.get("available", True):
            return f"{methodList.label(method)} cannot run here: {methodList.shortReason(method)}."
        if p.keepOutputFiles and not p.outputDirectory:
            return "Choose the folder for 'Keep files in' (Outputs), or untick it."
        return ""

    def updateRegisterButton(self) -> None:
        button = self.ui.registerButton
        if self.job is not None:
            button.text, button.enabled = "Cancel", True
            button.toolTip = "Stop the registration; the scene is left unchanged."
            return
        button.text = "Register"
        blocker = self.registerBlocker()
        button.enabled = not blocker
        button.toolTip = blocker or "Register the moving volume to the fixed volume (runs in the background)."
        if blocker and not self.ui.statusLabel.property("error"):
            self.setStatus(blocker, log=False)
        elif not blocker and self.ui.statusLabel.property("blocker"):
            self.setStatus("Ready.", log=False)
        self.ui.statusLabel.setProperty("blocker", bool(blocker))

    def onMethodChanged(self, index: int) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.method = self.ui.methodComboBox.itemData(index) or "auto"
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
        import json

        try:
            with open(self.cachedMethodsPath()) as file:
                methods = json.load(file)
            return methods if isinstance(methods, list) else []
        except (OSError, ValueError):
            return []

    def startEnvironmentChecks(self) -> None:
        """``dinoreg devices --json``, then ``dinoreg methods --json``: both in background processes."""
        if self.probe is None or self.probe.finished:
            self.ui.environmentLabel.text = "Checking the Python environment..."
            self.probe = self.logic.startProbe()
            self.timer.start()

    def onProbeFinished(self) -> None:
        info = self.probe.jsonOutput()
        warning = self.ui.environmentWarningLabel
        if not isinstance(info, dict):
            logging.error("DinoRegistration: the environment check failed:\n%s", self.probe.log())
            self.environment = None
            warning.text = "Could not start the engine's Python (PythonSlicer): see the Python console."
            warning.show()
            self.registerWhenReady = False
            return
        self.environment = info
        missing = missingSummary(info)
        if missing:
            warning.text = f"Missing Python packages: {missing}. They are installed when you press Register."
        elif info.get("torch_error"):
            warning.text = (f"PyTorch does not load ({info['torch_error']}): reinstall it with the PyTorch Utils "
                            "module, then Setup > Re-check.")
        warning.visible = bool(missing or info.get("torch_error"))
        gpus = ", ".join(f"{g['name']} ({g['free_mb'] / 1024:.1f} GB free)" for g in info.get("cuda", []))
        self.ui.environmentLabel.text = (f"PyTorch {info.get('torch') or 'not installed'}; "
                                         f"GPU: {gpus or 'none (CPU only)'}.")
        self.setDeviceChoices(info)
        if not missing and not info.get("torch_error"):
            self.methodsQuery = self.logic.startMethodsQuery()
            self.timer.start()
            if self.registerWhenReady:
                self.registerWhenReady = False
                self.onRegisterButton()
        else:
            self.registerWhenReady = False

    def onMethodsQueryFinished(self) -> None:
        import json

        methods = self.methodsQuery.jsonOutput()
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
        """Automatic (saying which method it will run), then the methods in order of recommendation."""
        self.methods = methods
        self._updatingGui = True
        try:
            combo = self.ui.methodComboBox
            combo.clear()
            combo.addItem(methodList.automaticLabel(methods) if methods else "Automatic (best available)", "auto")
            for item in methodList.methodItems(methods):
                combo.addItem(item["text"], item["data"])
                combo.setItemData(combo.count - 1, item["toolTip"], qt.Qt.ToolTipRole)
        finally:
            self._updatingGui = False
        self.updatePresetChoices()

    def selectedMethod(self) -> Optional[Dict[str, Any]]:
        name = self._parameterNode.method if self._parameterNode else "auto"
        return next((m for m in self.methods if m.get("name") == name), None)

    def updatePresetChoices(self) -> None:
        """Presets first and enabled for Automatic too; the method's own presets after the common ones."""
        method = self.selectedMethod()
        p = self._parameterNode
        self._updatingGui = True
        try:
            combo = self.ui.presetComboBox
            combo.clear()
            for text, name in methodList.presetItems(method):
                combo.addItem(text, name)
            combo.enabled = combo.count > 1
            models = self.ui.featureModelComboBox
            current = models.currentText
            models.clear()
            models.addItem("method default")
            key = methodList.methodParameterKey(method, "featureModel")
            if key:
                models.addItems([str(method["parameters"][key])])
            models.setCurrentText(current or "method default")
        finally:
            self._updatingGui = False
        if p is not None:
            preset = methodList.presetFor(method, p.preset)
            if preset != p.preset:
                p.preset = preset
        self.updateGuiFromParameterNode()

    def updateMethodInfo(self) -> None:
        """One line about the selected method; the Download button beside it when weights are missing."""
        method = self.selectedMethod()
        info, download = self.ui.methodInfoLabel, self.ui.downloadWeightsButton
        download.visible = False
        info.toolTip = ""
        if method is None:
            info.text = ("" if self.methods else "Checking which methods can run here...") \
                if self._parameterNode is None or self._parameterNode.method == "auto" else "Unknown method."
        elif method.get("available", True):
            info.text = str(method.get("card") or method.get("summary") or "")
        else:
            info.text = methodList.shortReason(method)
            info.toolTip = str(method.get("reason", ""))
            download.visible = methodList.needsWeights(method) and self.weightsProcess is None
        if self._parameterNode is not None and self._parameterNode.method == "auto" and self.methods:
            betterMissing = next((m for m in methodList.shownMethods(self.methods)
                                  if not m.get("available", True) and methodList.needsWeights(m)), None)
            if betterMissing is not None and self.weightsProcess is None:
                info.text = f"{methodList.shortReason(betterMissing)}."
                info.toolTip = (f"Download them to run {methodList.label(betterMissing)}, which is more accurate.\n\n"
                                f"{betterMissing.get('reason', '')}")
                download.visible = True
        for setting, widget in (("featureModel", self.ui.featureModelComboBox),
                                ("regularisation", self.ui.regularisationSpinBox),
                                ("iterations", self.ui.iterationsSpinBox),
                                ("inverseConsistent", self.ui.inverseConsistentCheckBox)):
            key = methodList.methodParameterKey(method, setting)
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

    def packagesReady(self) -> bool:
        """True if the engine's packages are present. Otherwise asks (once per session) and installs them (the core
        packages, and those of the chosen method's family, e.g. transformers when a DINO method is first chosen),
        then re-checks in the background; Register continues by itself when the check passes."""
        families = methodFamilies(self._parameterNode.method if self._parameterNode else "auto")
        if self.environment is not None and not missingSummary(self.environment, families):
            return True
        if self.pipInstall is not None:
            self.setStatus("Python packages are being installed: Register starts when they are ready.")
            self.registerWhenReady = True
            return False
        if self.environment is None:
            self.setStatus("Still checking the Python environment: Register starts when it is done.")
            self.registerWhenReady = True
            self.startEnvironmentChecks()
            return False
        missing = missingSummary(self.environment, families)
        if (families or ("",))[0] in self.askedToInstall:
            self.setStatus(f"Missing Python packages: {missing}. Use Setup > Install packages.", error=True)
            return False
        self.askedToInstall.add((families or ("",))[0])
        if not slicer.util.confirmOkCancelDisplay(
                f"DINO Registration needs these Python packages: {missing}.\n\nInstall them now? "
                "PyTorch is a large download (up to a few GB) and installing may take several minutes.",
                windowTitle="DINO Registration"):
            self.setStatus("Registration needs the missing Python packages.", error=True)
            return False
        if self.installPackages(families):
            self.registerWhenReady = True
        return False

    def onInstallPackages(self) -> None:
        self.installPackages(methodFamilies(self._parameterNode.method if self._parameterNode else "auto"))

    def installPackages(self, families: tuple = ()) -> bool:
        """Install PyTorch through PyTorch Utils when present (its own progress window, blocking as that module is),
        then start pip for the rest in the background: a progress dialog shows pip's latest line and its Cancel
        stops pip while it downloads (see ``DinoRegistrationLib.install.PipInstall`` for what cannot be undone).
        The timer reaps pip and re-checks the environment; False if the install could not start."""
        if self.pipInstall is not None:
            self.setStatus("Python packages are being installed: wait for it, or press Cancel in its window.")
            return False
        try:
            self.pipInstall = installEnginePackages(self.environment or {}, families, self.logic.pythonExecutable)
        except Exception as error:
            logging.exception("DinoRegistration: installing packages failed")
            self.setStatus(f"Installing Python packages failed: {error}", error=True)
            return False
        if self.pipInstall is None:  # only torch (PyTorch Utils, done) was missing
            self.onPackagesInstalled()
            return True
        self.installDialog = slicer.util.createProgressDialog(
            labelText="Installing Python packages...", maximum=0, windowTitle="DINO Registration")
        self.installDialog.connect("canceled()", self.onCancelInstall)
        self.setStatus(f"Installing Python packages: {' '.join(self.pipInstall.requirements)}")
        self.timer.start()
        return True

    def onCancelInstall(self) -> None:
        """The install dialog's Cancel: stops pip while it downloads (the environment is unchanged); once pip
        writes packages it is left to finish (stopping it there could leave a half-installed package)."""
        if self.pipInstall is None or self.pipInstall.finished:
            return
        self.registerWhenReady = False
        if self.pipInstall.cancel():
            self.setStatus("Stopping the installation (nothing was installed yet)...")
        else:
            self.setStatus("pip is already writing the packages: it finishes this step (stopping it now could leave "
                           "a broken package).")

    def pollPipInstall(self) -> None:
        """From the timer: show pip's latest line; when it ended, say what happened and re-check."""
        process = self.pipInstall
        process.poll()
        if self.installDialog is not None and process.lastLine:
            self.installDialog.labelText = f"Installing Python packages...\n{process.lastLine[:120]}"
        if not process.finished:
            return
        self.pipInstall = None
        if self.installDialog is not None:
            self.installDialog.close()
            self.installDialog = None
        logging.info("DinoRegistration: pip output:\n%s", "\n".join(process.stdoutLines[-200:] + list(process.stderrTail)))
        if process.cancelled:
            self.registerWhenReady = False
            self.setStatus("Installation cancelled: nothing was installed.")
        elif process.returncode != 0:
            self.registerWhenReady = False
            self.setStatus(f"Installing Python packages failed: {process.lastErrorLine() or 'see the Python console'}",
                           error=True)
        else:
            if process.cancelRequested:
                logging.info("DinoRegistration: Cancel came after pip had started writing packages; they are installed")
            self.onPackagesInstalled()

    def onPackagesInstalled(self) -> None:
        self.environment = None
        self.startEnvironmentChecks()
        self.setStatus("Packages installed; checking them...")

    def onDownloadWeights(self) -> None:
        method = self.selectedMethod()
        if method is None or method.get("available", True):
            method = next((m for m in methodList.shownMethods(self.methods) if methodList.needsWeights(m)), None)
        name = methodList.weightsName(method or {})
        if not name:
            self.setStatus("Could not tell which weights to download: see 'dinoreg weights --help'.", error=True)
            return
        if methodList.isNetworkDownload(method or {}):
            self.weightsProcess = self.logic.startModelDownload(name)
        else:
            self.weightsProcess = self.logic.startWeightsDownload(name)
        self.ui.downloadWeightsButton.visible = False
        self.setStatus(f"Downloading model weights '{name}' (once; they are kept in the cache)...")
        self.showProgress(f"downloading {name}", 0.0, None, busy=True)
        self.timer.start()

    def onClearCache(self) -> None:
        if not slicer.util.confirmOkCancelDisplay("Delete all downloaded model weights? They are downloaded "
                                                  "again when needed.", windowTitle="DINO Registration"):
            return
        self.clearProcess = self.logic.startWeightsClear()
        self.ui.clearCacheButton.enabled = False
        self.setStatus("Clearing the model cache...")
        self.timer.start()

    def onClearCacheFinished(self) -> None:
        ok = self.clearProcess.returncode == 0
        self.ui.clearCacheButton.enabled = True
        self.setStatus("Model weights cache cleared." if ok else "Clearing the cache failed: see the Python console.",
                       error=not ok)
        if not ok:
            logging.error("DinoRegistration: weights clear failed:\n%s", self.clearProcess.log())
        self.startEnvironmentChecks()

    # ------------------------------------------------------------------ running

    def onRegisterButton(self) -> None:
        if self.job is not None:
            self.cancelJob()
            return
        blocker = self.registerBlocker()
        if blocker:
            self.setStatus(blocker, error=True)
            return
        if not self.packagesReady():
            return
        p = self._parameterNode
        method = self.selectedMethod()
        params = {}
        for setting, value in (("featureModel", p.featureModel), ("regularisation", p.regularisation),
                               ("iterations", p.iterations), ("inverseConsistent", p.inverseConsistent)):
            key = methodList.methodParameterKey(method, setting)
            if key and value:
                params[key] = str(value)
        options = JobOptions(method=p.method or "auto", preset=p.preset, device=p.device or "auto",
                                      params=params, affineStage=p.affineStage, computeInverse=p.computeInverse,
                                      computeJacobian=p.computeJacobian, keepAffine=p.keepAffine,
                                      outputDirectory=p.outputDirectory if p.keepOutputFiles else "",
                                      outputVolume=p.outputVolume, outputTransform=p.outputTransform)
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

    def cancelJob(self) -> None:
        """Stop the running registration now; its engine process is reaped from the timer."""
        if self.job is not None:
            job = self.job
            job.cancel()  # returns at once; calls onJobFinished
            if not job.cleanedUp:
                self.stoppingJobs.append(job)
                self.timer.start()

    def onTimer(self) -> None:
        if self.job is not None:
            self.job.poll()
            if self.job is not None:
                self.showProgress(self.job.stage, self.job.fraction, self.job.secondsLeft)
        self.stoppingJobs = [job for job in self.stoppingJobs if not (job.poll() and job.cleanedUp)]
        for attribute, onFinished in (("probe", self.onProbeFinished), ("methodsQuery", self.onMethodsQueryFinished),
                                      ("clearProcess", self.onClearCacheFinished)):
            process = getattr(self, attribute)
            if process is not None and not process.finished:
                process.poll()
                if process.finished:
                    onFinished()
        if self.weightsProcess is not None:
            self.pollWeightsDownload()
        if self.pipInstall is not None:
            self.pollPipInstall()
        busy = [p for p in (self.probe, self.methodsQuery, self.weightsProcess, self.clearProcess, self.pipInstall)
                if p is not None and not p.finished]
        if self.job is None and not busy and not self.stoppingJobs:
            self.timer.stop()

    def pollWeightsDownload(self) -> None:
        """Download progress from the engine's JSON events (bytes known: a real bar; else a busy bar)."""
        process = self.weightsProcess
        for event in process.poll():
            if event.get("event") == "progress":
                fraction = event.get("fraction")
                self.showProgress(event.get("stage", "download"), float(fraction or 0.0), event.get("seconds_left"),
                                  busy=fraction is None)
        if process.finished:
            self.weightsProcess = None
            self.ui.progressBar.hide()
            if process.returncode == 0:
                self.setStatus("Model weights downloaded.")
                self.methodsQuery = self.logic.startMethodsQuery()
            else:
                logging.error("DinoRegistration: weights download failed:\n%s", process.log())
                self.setStatus(f"Downloading weights failed: {process.lastErrorLine() or 'see the Python console'}",
                               error=True)
            self.updateMethodInfo()

    def onJobFinished(self, job: RegistrationJob) -> None:
        self.job = None
        self.ui.progressBar.hide()
        self.updateRegisterButton()
        if job.state == "done":
            self.storeResult(job.result)
            self.setStatus(resultSummary(job.result, time.monotonic() - job.startTime))
            self.showResultViews()
            slicer.util.resetSliceViews()
        elif job.state == "failed":
            self.setStatus(job.message, error=True, log=False)  # the job logged it with the engine's log
            slicer.util.errorDisplay(job.message, windowTitle="DINO Registration", detailedText=job.details[-5000:])
        else:
            self.setStatus(job.message)

    def storeResult(self, result: JobResult) -> None:
        p = self._parameterNode
        wasModified = p.StartModify()
        try:
            p.resultFixed, p.resultMoving = result.fixedVolume, result.movingVolume
            p.resultWarped, p.resultTransform = result.warpedVolume, result.transform
            p.resultInverseTransform = result.inverseTransform
            p.resultHeatmap, p.resultHeatmapBefore = result.heatmap, result.heatmapBefore
            p.resultJacobian = result.jacobian
            p.resultReport, p.resultFolder = result.reportNode, result.outputDirectory or ""
            p.viewMode, p.showBefore = "fade", False
        finally:
            p.EndModify(wasModified)

    def lastResult(self) -> Optional[JobResult]:
        p = self._parameterNode
        if p is None or not p.resultFixed or not p.resultWarped:
            return None
        return JobResult(fixedVolume=p.resultFixed, movingVolume=p.resultMoving, warpedVolume=p.resultWarped,
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

    # ------------------------------------------------------------------ landmark check

    def onCheckLandmarks(self) -> None:
        p = self._parameterNode
        try:
            summary = self.logic.landmarkCheck(p.fixedLandmarks, p.movingLandmarks, p.resultTransform,
                                               p.resultInverseTransform)
        except RegistrationError as error:
            self.ui.landmarkSummaryLabel.text = str(error)
            self.landmarkSummary = None
            self.ui.landmarkTable.setRowCount(0)
            return
        self.landmarkSummary = summary
        self.ui.landmarkSummaryLabel.text = formatLandmarkSummary(summary)
        try:
            self.logic.recordLandmarkCheck(summary, p.resultReport, p.resultFolder)
        except OSError as error:
            self.setStatus(f"The landmark check could not be added to report.json: {error}", error=True)
        table = self.ui.landmarkTable
        table.setRowCount(summary["count"])
        worst = set(summary["worst"])
        for row, point in enumerate(summary["points"]):
            for column, text in enumerate((point["label"], f"{point['before_mm']:.1f}", f"{point['after_mm']:.1f}")):
                item = qt.QTableWidgetItem(text)
                if row in worst:
                    item.setForeground(qt.QBrush(qt.QColor("#c0392b")))
                table.setItem(row, column, item)
        self.updateJumpButton()

    def updateJumpButton(self) -> None:
        self.ui.jumpButton.enabled = self.landmarkSummary is not None and self.ui.landmarkTable.currentRow() >= 0

    def onJumpToPoint(self, *args: Any) -> None:
        """Centre the slice views on the fixed point of the selected row."""
        row = self.ui.landmarkTable.currentRow()
        p = self._parameterNode
        if self.landmarkSummary is None or row < 0 or p.fixedLandmarks is None:
            return
        from DinoRegistrationLib.landmarks import markupsPoints

        labels, points = markupsPoints(p.fixedLandmarks)
        label = self.landmarkSummary["points"][row]["label"]
        index = labels.index(label) if label in labels else row
        if index < len(points):
            self.logic.jumpToPoint(slicer.mrmlScene, points[index])

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
        self.ui.statusLabel.setProperty("error", error)
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        if log:
            (logging.error if error else logging.info)("DinoRegistration: %s", text)


def selectData(combo: Any, data: str) -> None:
    index = combo.findData(data)
    if index >= 0 and combo.currentIndex != index:
        combo.setCurrentIndex(index)


def resultSummary(result: JobResult, seconds: float) -> str:
    """'Done in 21 s: similarity (NCC) 0.912 -> 0.981, folding 0.00% of voxels; files in ...'"""
    report = result.report
    summary = f"Done in {seconds:.0f} s"
    before, after = report.get("similarity_before", {}), report.get("similarity_after", {})
    if "ncc" in before and "ncc" in after:
        summary += f": similarity (NCC) {before['ncc']:.3f} -> {after['ncc']:.3f}"
    folding = (report.get("jacobian") or {}).get("percent_nonpositive")
    if folding is not None:
        summary += f", folding {folding:.2f}% of voxels"
    if result.outputDirectory:
        summary += f"; files in {result.outputDirectory}"
    return summary + "."


#
# DinoRegistrationTest
#

class DinoRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload and Test, and the ctest registered by CMake): registers the bundled
    demo pair. Skipped, with the reason, where the engine's packages are missing (e.g. Slicer's extension
    build machines have no PyTorch)."""

    def setUp(self) -> None:
        self.skipIfEngineMissing()
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_AffineRegistration()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_BadInputReportsError()

    def skipIfEngineMissing(self) -> None:
        from dinoreg.requirements import check_requirements

        missing = missingSummary(check_requirements())
        if missing:
            message = (f"DinoRegistration self-test skipped: the engine's Python packages are missing here ({missing}). "
                       "Install them with the module's Setup > Install packages.")
            logging.warning(message)
            raise unittest.SkipTest(message)

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
        result = logic.register(fixed, moving, JobOptions(method="affine", device="cpu"), timeout=600)
        self.assertEqual(result.warpedVolume.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertIsNotNone(result.transform.GetTransformFromParent())
        self.assertGreater(result.report["similarity_after"]["ncc"], result.report["similarity_before"]["ncc"])
        logic.showComparison(result, "difference")
        self.delayDisplay("Affine registration passed")

    def test_CancelLeavesSceneUnchanged(self) -> None:
        fixed, moving = self.loadDemoPair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = DinoRegistrationLogic().startRegistration(fixed, moving, JobOptions(method="affine"))
        time.sleep(0.5)
        job.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertTrue(job.wait(30))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel passed")

    def test_BadInputReportsError(self) -> None:
        fixed, moving = self.loadDemoPair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RegistrationError) as context:
            DinoRegistrationLogic().register(fixed, moving, JobOptions(method="no-such-method"), timeout=120)
        self.assertIn("no-such-method", str(context.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Error reporting passed")

"""The panel's own code run headless: the Widget driven through a whole session on a real MRML scene.

Slicer's Qt (PythonQt) is not available outside Slicer, so the widgets of the ``.ui`` file are replaced by
permissive stand-ins that record what the panel sets (text, enabled, items...); everything else is real:
the MRML scene (slicer-core), the Logic, the background engine processes (``dinoreg devices``,
``dinoreg methods``, ``dinoreg register``). This runs every code path of the Widget that a user reaches by
opening the module, choosing volumes and a method, registering, checking landmarks and cancelling, and
catches the errors that would otherwise show only inside Slicer (a wrong name, a wrong key, a blocking wait).
"""

from __future__ import annotations

import json
import sys
import time
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package is not slicer-core", allow_module_level=True)

import slicer.util  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import DinoRegistration  # noqa: E402
from DinoRegistrationLib import parameters  # noqa: E402
from test_slicer_install import fake_pip  # noqa: E402,F401 (fixture)
from test_slicer_logic import add_pair, new_scene, private_temp_folder  # noqa: E402,F401 (autouse)

UI_FILE = MODULE_DIR / "Resources" / "UI" / "DinoRegistration.ui"


class StandInWidget:
    """Records what the panel sets; behaves like a combo box, table or button where the panel relies on it."""

    def __init__(self, name: str, cls: str) -> None:
        self.name, self.cls = name, cls
        self.text, self.toolTip, self.enabled, self.visible, self.checked = "", "", True, True, False
        self.items: list = []  # combo box: [text, data, tooltip]
        self.currentIndex = -1
        self.value, self.maximum, self.format, self.directory = 0.5, 1000, "", ""
        self.rows, self.cells, self.selectedRow = 0, {}, -1
        self.properties, self.slots = {}, {}

    # signals, visibility, properties
    def connect(self, signal: str, slot) -> None:
        self.slots[signal] = slot

    def hide(self) -> None:
        self.visible = False

    def show(self) -> None:
        self.visible = True

    def setStyleSheet(self, sheet: str) -> None:
        self.properties["styleSheet"] = sheet

    def setProperty(self, name: str, value) -> None:
        self.properties[name] = value

    def setMRMLScene(self, scene) -> None:
        pass

    # combo box
    @property
    def count(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def addItem(self, text: str, data=None) -> None:
        self.items.append([text, data, ""])
        if self.currentIndex < 0:
            self.currentIndex = 0

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def findData(self, data) -> int:
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def itemData(self, index: int):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def setItemData(self, index: int, value, role) -> None:
        self.items[index][2] = value

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if 0 <= self.currentIndex < len(self.items) else ""

    def setCurrentText(self, text: str) -> None:
        self.currentIndex = next((i for i, item in enumerate(self.items) if item[0] == text), self.currentIndex)

    # table
    def setRowCount(self, rows: int) -> None:
        self.rows, self.cells = rows, {}

    def setItem(self, row: int, column: int, item) -> None:
        self.cells[(row, column)] = item

    def currentRow(self) -> int:
        return self.selectedRow

    def property(self, name: str):  # last: the name shadows the builtin inside the class body
        return self.properties.get(name)


class StandInItem:
    def __init__(self, text: str) -> None:
        self.text, self.foreground = text, None

    def setForeground(self, brush) -> None:
        self.foreground = brush


def stand_in_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")

    class QTimer:
        def __init__(self) -> None:
            self.active = False

        def setInterval(self, ms: int) -> None:
            pass

        def connect(self, signal: str, slot) -> None:
            self.slot = slot

        def start(self) -> None:
            self.active = True

        def stop(self) -> None:
            self.active = False

    qt.QTimer, qt.QTableWidgetItem = QTimer, StandInItem
    qt.QBrush, qt.QColor = (lambda color: ("brush", color)), (lambda name: name)
    qt.Qt = types.SimpleNamespace(ToolTipRole=3)
    return qt


class StandInParameterNode:
    """The declared fields with their defaults, calling its observers on every change (as the MRML node's
    ModifiedEvent does, once per StartModify/EndModify block); connectGui binds nothing here (the bindings
    are checked in test_slicer_declarations)."""

    def __init__(self) -> None:
        object.__setattr__(self, "_observers", [])
        object.__setattr__(self, "_batch", 0)
        for name in parameters.DinoRegistrationParameterNode.__annotations__:
            object.__setattr__(self, name, getattr(parameters.DinoRegistrationParameterNode, name, None))

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if not self._batch:
            self.Modified()

    def Modified(self) -> None:
        for callback in list(self._observers):
            callback(self, "ModifiedEvent")

    def connectGui(self, ui) -> str:
        return "tag"

    def disconnectGui(self, tag) -> None:
        pass

    def StartModify(self) -> int:
        object.__setattr__(self, "_batch", self._batch + 1)
        return 0

    def EndModify(self, was: int) -> None:
        object.__setattr__(self, "_batch", self._batch - 1)
        self.Modified()


def observe(widget, caller, event, callback) -> None:
    if isinstance(caller, StandInParameterNode):
        caller._observers.append(callback)


def forget(widget, caller, event, callback) -> None:
    if isinstance(caller, StandInParameterNode) and callback in caller._observers:
        caller._observers.remove(callback)


@pytest.fixture
def panel(tmp_path, monkeypatch):
    """The Widget set up on a fresh scene, with stand-in widgets; returns (widget, ui, scene, errors shown)."""
    scene = new_scene()
    names = {w.get("name"): w.get("class") for w in ElementTree.parse(UI_FILE).getroot().iter("widget")}
    widgets = {name: StandInWidget(name, cls) for name, cls in names.items()}
    ui = types.SimpleNamespace(**widgets)
    shown_errors = []
    monkeypatch.setattr(DinoRegistration, "qt", stand_in_qt(), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(cachePath=str(tmp_path / "cache"), processEvents=lambda: None),
                        raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: widgets["DinoRegistration"])
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: ui)
    monkeypatch.setattr(slicer.util, "resetSliceViews", lambda: None)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown_errors.append(text))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: True)
    monkeypatch.setattr(DinoRegistration.DinoRegistrationLogic, "getParameterNode", lambda self: StandInParameterNode())
    monkeypatch.setattr(DinoRegistration.VTKObservationMixin, "addObserver", observe)
    monkeypatch.setattr(DinoRegistration.VTKObservationMixin, "removeObserver", forget)
    widget = DinoRegistration.DinoRegistrationWidget()
    widget.layout = types.SimpleNamespace(addWidget=lambda w: None)
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.resourcePath = lambda relative: str(MODULE_DIR / "Resources" / relative)
    widget.setup()
    yield widget, ui, scene, shown_errors
    widget.cleanup()


def run_timer(widget, until, timeout: float = 300) -> None:
    """Tick the panel's timer (as Qt would every 200 ms) until ``until()`` or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        widget.onTimer()
        time.sleep(0.05)


def test_a_whole_session_in_the_panel(panel):
    widget, ui, scene, shown_errors = panel
    # opening: the environment check and the method list run in the background, and are shown
    assert ui.registerButton.enabled is False and ui.statusLabel.text == "Select the fixed and moving volumes."
    run_timer(widget, lambda: widget.methods and widget.methodsQuery.finished, 180)
    assert ui.environmentLabel.text.startswith("PyTorch ") and not ui.environmentWarningLabel.visible
    assert ui.methodComboBox.items[0][0] == "Automatic: MIND zero-shot (DINO weights not downloaded yet)"
    assert "identity" not in [item[1] for item in ui.methodComboBox.items]
    assert [item[0] for item in ui.presetComboBox.items] == ["Brain MR", "Body CT", "Fast", "Accurate"]
    assert ui.presetComboBox.enabled  # presets also for Automatic
    assert ui.downloadWeightsButton.visible and ui.methodInfoLabel.text == "DINO weights not downloaded yet."
    assert [item[1] for item in ui.deviceComboBox.items] == ["auto", "cpu"]

    # inputs, method and preset, then Register
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = add_pair(scene)
    p.keepOutputFiles = True  # the node's ModifiedEvent updates the panel
    assert not ui.registerButton.enabled and "Keep files in" in ui.statusLabel.text  # the reason, in the status line
    p.keepOutputFiles = False
    assert ui.registerButton.enabled and ui.statusLabel.text == "Ready."
    widget.onMethodChanged(ui.methodComboBox.findData("mind-zeroshot"))
    widget.onPresetChanged(ui.presetComboBox.findData("fast"))
    assert (p.method, p.preset) == ("mind-zeroshot", "fast")
    assert ui.regularisationSpinBox.enabled and not ui.featureModelComboBox.enabled  # MIND has no feature model
    p.computeInverse, p.computeJacobian = True, True
    widget.onRegisterButton()
    assert ui.registerButton.text == "Cancel" and ui.progressBar.visible
    run_timer(widget, lambda: widget.job is None)
    assert not shown_errors, shown_errors
    assert ui.statusLabel.text.startswith("Done in") and "similarity (NCC)" in ui.statusLabel.text
    assert p.resultWarped is not None and p.resultTransform is not None and p.resultJacobian is not None
    assert ui.resultsCollapsibleButton.enabled and ui.registerButton.text == "Register"

    # compare: the toggle shows the original moving image
    ui.compareButton.checked = True
    widget.onViewModeChanged()
    assert ui.compareButton.text == "Showing: before registration"

    # check with landmarks
    points = np.array([[-12.0, -8.0, 4.0], [10.0, -4.0, -6.0], [2.0, 12.0, 8.0]])
    shift = np.array([3.0, -2.0, 1.5])  # the moving content is the fixed content moved by this (test_slicer_logic)
    for name, offset, attribute in (("F", 0.0, "fixedLandmarks"), ("M", 1.0, "movingLandmarks")):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for point in points + offset * shift:
            node.AddControlPoint(*point)
        setattr(p, attribute, node)
    widget.onCheckLandmarks()
    summary = widget.landmarkSummary
    assert "engine's inverse field" in summary["direction"]  # the field the CLI's check uses (issue 15)
    assert ui.landmarkSummaryLabel.text.startswith("Landmarks (3, by order)") and ui.landmarkTable.rows == 3
    assert summary["mean_before_mm"] == pytest.approx(np.linalg.norm(shift)) and summary["mean_after_mm"] < 1.0
    assert json.loads(p.resultReport.GetText())["landmarks"]["count"] == 3  # the check reaches the report
    ui.landmarkTable.selectedRow = 0
    widget.updateJumpButton()
    assert ui.jumpButton.enabled
    widget.onJumpToPoint()
    widget.onSceneStartClose(None, None)  # Close Scene: the table of the closed scene's points goes too
    assert ui.landmarkTable.rows == 0 and widget.landmarkSummary is None and not ui.jumpButton.enabled
    widget.setParameterNode(p)  # (the scene is not really closed here: carry on with the same inputs)

    # cancel a second run: at once, and nothing is added
    count = scene.GetNumberOfNodes()
    widget.onRegisterButton()
    started = time.monotonic()
    widget.onRegisterButton()  # the same button, now Cancel
    assert time.monotonic() - started < 0.5 and widget.job is None
    assert ui.statusLabel.text.startswith("Registration cancelled")
    run_timer(widget, lambda: not widget.stoppingJobs, 30)
    assert scene.GetNumberOfNodes() == count


def test_an_unavailable_method_blocks_register_with_the_reason_and_offers_the_download(panel):
    widget, ui, scene, _ = panel
    run_timer(widget, lambda: widget.methods and widget.methodsQuery.finished, 180)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = add_pair(scene)
    index = ui.methodComboBox.findData("dino-zeroshot")
    assert ui.methodComboBox.items[index][0].endswith("(unavailable)")
    widget.onMethodChanged(index)
    assert not ui.registerButton.enabled
    label = ui.methodComboBox.items[index][0][: -len(" (unavailable)")]
    assert ui.statusLabel.text == f"{label} cannot run here: DINO weights not downloaded yet."
    assert ui.downloadWeightsButton.visible and "weights download" in ui.methodInfoLabel.toolTip
    widget.onDownloadWeights()  # no internet here: the failure is reported in one line
    run_timer(widget, lambda: widget.weightsProcess is None, 120)
    assert ui.statusLabel.text.startswith("Downloading weights failed") or ui.statusLabel.text == "Model weights downloaded."


def test_the_download_button_of_a_published_network_fetches_it_with_models_download(panel, monkeypatch):
    """uniGradICON's weights come from 'dinoreg models download', not from the DINO backbone downloader."""
    widget, ui, scene, _ = panel
    run_timer(widget, lambda: widget.methods and widget.methodsQuery.finished, 180)
    index = ui.methodComboBox.findData("unigradicon")
    assert index >= 0 and ui.methodComboBox.items[index][0].startswith("uniGradICON (trained network, download")
    widget.onMethodChanged(index)
    assert ui.downloadWeightsButton.visible
    started = []
    monkeypatch.setattr(widget.logic, "startModelDownload",
                        lambda name: started.append(name) or widget.logic.startEngine("models", "list"))
    monkeypatch.setattr(widget.logic, "startWeightsDownload", lambda name: pytest.fail("DINO downloader used"))
    widget.onDownloadWeights()
    assert started == ["unigradicon"]
    run_timer(widget, lambda: widget.weightsProcess is None, 120)


def test_register_installs_only_the_chosen_methods_package_family(panel, monkeypatch):
    """A fresh environment missing the DINO family: MIND registers without installing anything; a DINO method
    asks once and installs the 'dino' family (transformers) through the installer, then re-checks."""
    widget, ui, scene, _ = panel
    installed = []
    monkeypatch.setattr(DinoRegistration, "installEnginePackages",
                        lambda info, families=(), python=None: installed.append(families))  # nothing left for pip
    monkeypatch.setattr(widget, "startEnvironmentChecks", lambda: None)
    monkeypatch.setattr(slicer.util, "createProgressDialog", lambda **kwargs: types.SimpleNamespace(close=lambda: None))
    no_dino = {"missing": [], "outdated": [], "install": [],
               "optional": {"dino": {"missing": ["transformers"], "outdated": [], "install": ["transformers>=5"]},
                            "losses": {"missing": ["monai"], "outdated": [], "install": ["monai>=1.3"]}}}
    p = widget._parameterNode
    p.method = "mind-zeroshot"
    widget.environment = no_dino
    assert widget.packagesReady() and installed == []
    p.method = "dino-zeroshot"
    widget.environment = no_dino
    assert not widget.packagesReady() and installed == [("dino",)] and widget.registerWhenReady


class StandInProgressDialog:
    """What slicer.util.createProgressDialog returns, as far as the panel uses it (a QProgressDialog)."""

    def __init__(self, **kwargs) -> None:
        self.labelText, self.closed, self.slots = kwargs.get("labelText", ""), False, {}

    def connect(self, signal: str, slot) -> None:
        self.slots[signal] = slot

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def install_panel(panel, fake_pip, monkeypatch):
    """The panel with a fake pip (test_slicer_install.FAKE_PIP) and a recorded re-check."""
    widget, ui, scene, _ = panel
    dialogs, checks = [], []
    monkeypatch.setattr(slicer.util, "createProgressDialog", lambda **kwargs: dialogs.append(StandInProgressDialog(**kwargs)) or dialogs[-1])
    monkeypatch.setattr(widget, "startEnvironmentChecks", lambda: checks.append(True))
    widget.logic.pythonExecutable = sys.executable
    widget.environment = {"missing": ["tinypkg"], "outdated": [], "install": ["tinypkg"]}
    return widget, ui, dialogs, checks, fake_pip[0]


def test_install_runs_pip_in_the_background_and_its_cancel_stops_it(install_panel, monkeypatch):
    """Issue 15: the install dialog's Cancel did nothing and the panel froze between pip's lines (pip ran in
    Slicer's main thread). Now pip runs in the background: the panel returns at once, the dialog shows pip's
    latest line, and Cancel (while pip downloads) stops it with nothing installed."""
    widget, ui, dialogs, checks, site = install_panel
    monkeypatch.setenv("DOWNLOAD_SECONDS", "120")
    monkeypatch.setenv("INSTALL_SECONDS", "0")
    widget.registerWhenReady = True
    assert widget.installPackages(()) is True
    assert widget.pipInstall is not None and widget.pipInstall.running  # returned while pip runs
    dialog = dialogs[-1]
    assert "canceled()" in dialog.slots
    run_timer(widget, lambda: "Collecting tinypkg" in dialog.labelText, 60)
    dialog.slots["canceled()"]()  # the dialog's Cancel button
    assert ui.statusLabel.text.startswith("Stopping the installation") and not widget.registerWhenReady
    run_timer(widget, lambda: widget.pipInstall is None, 30)
    assert dialog.closed and ui.statusLabel.text == "Installation cancelled: nothing was installed."
    assert list(site.iterdir()) == [] and checks == []


def test_install_finishes_in_the_background_then_rechecks(install_panel, monkeypatch):
    widget, ui, dialogs, checks, site = install_panel
    monkeypatch.setenv("DOWNLOAD_SECONDS", "0")
    monkeypatch.setenv("INSTALL_SECONDS", "0")
    assert widget.installPackages(()) is True
    assert widget.installPackages(()) is False and "being installed" in ui.statusLabel.text  # one pip at a time
    assert not widget.packagesReady() and widget.registerWhenReady  # Register meanwhile: it runs when pip is done
    run_timer(widget, lambda: widget.pipInstall is None, 60)
    assert dialogs[-1].closed and (site / "tinypkg.installed").exists()
    assert checks == [True] and ui.statusLabel.text == "Packages installed; checking them..."


def test_module_cleanup_mid_run_stops_the_engine_and_removes_the_exported_images(panel):
    """Slicer unloads the modules when it quits (qSlicerCoreApplication::onAboutToQuit, v5.6.0-v5.10.0), which
    calls the panel's cleanup(): the running registration's work folder (exported patient images) goes at once."""
    widget, ui, scene, _ = panel
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = add_pair(scene)
    widget.environment = {"missing": [], "outdated": [], "install": []}
    widget.onRegisterButton()
    job = widget.job
    assert job is not None and Path(job.workDir).is_dir()
    widget.cleanup()
    assert not Path(job.workDir).exists() and job.process.process.poll() is not None


def test_the_module_connects_the_exit_cleanup_to_the_application(monkeypatch):
    from DinoRegistrationLib.logic import removeWorkDirectoriesNow

    slots = {}
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: slots.update({signal: slot})),
                        raising=False)
    DinoRegistration.DinoRegistration(types.SimpleNamespace())
    assert slots == {"aboutToQuit()": removeWorkDirectoriesNow}


def ctk_set_directory(button: StandInWidget, folder: str) -> None:
    """ctkDirectoryButton::setDirectory as CTK implements it at the commits Slicer 5.6.0, 5.8.1 and 5.10.0 build
    (f53820a4, 82cae578, dd4caeae; Libs/Widgets/ctkDirectoryButton.cpp): directorySelected(QString) every time a
    folder is chosen, directoryChanged(QString) only when it differs from the current one."""
    same = button.directory == folder
    button.directory = folder
    for signal in ("directorySelected(QString)",) + (() if same else ("directoryChanged(QString)",)):
        if signal in button.slots:
            button.slots[signal](folder)


def test_choosing_the_same_output_folder_after_close_scene_counts(panel, tmp_path):
    """Close Scene resets the parameter node while the button still shows the old folder; choosing that folder
    again emits only directorySelected, which must set the parameter (issue 15)."""
    widget, ui, scene, _ = panel
    button, folder = ui.outputDirectoryButton, str(tmp_path / "kept")
    assert {"directorySelected(QString)", "directoryChanged(QString)"} <= set(button.slots)
    ctk_set_directory(button, folder)
    assert widget._parameterNode.outputDirectory == folder
    widget.onSceneStartClose(None, None)  # Close Scene: a new parameter node with the defaults
    widget.setParameterNode(StandInParameterNode())
    assert widget._parameterNode.outputDirectory == "" and button.directory == folder
    ctk_set_directory(button, folder)  # the user picks the same folder again
    assert widget._parameterNode.outputDirectory == folder

"""The engine's Python packages inside Slicer: what is missing (from ``dinoreg devices --json``) and how
to install it. The list of packages and versions is the engine's (``dinoreg.requirements``);
nothing is listed here.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, Iterable, List, Optional, Tuple

from DinoRegistrationLib.process import CANCEL_GRACE_SECONDS, EngineProcess, defaultPythonExecutable
from dinoreg.requirements import (CORE_REQUIREMENTS, ENGINE_REQUIREMENTS, TORCH, installed_version, is_at_least, split_requirement)


def methodFamilies(methodName: str) -> Tuple[str, ...]:
    """The optional package families (``dinoreg.requirements.EXTRA_REQUIREMENTS``) a method needs:
    ('dino',) for the DINO feature methods; none for MIND, affine, identity, Automatic or the learned networks."""
    return ("dino",) if (methodName or "").startswith("dino") else ()


def missingSummary(info: Dict[str, Any], families: Iterable[str] = ()) -> str:
    """'torch, monai; transformers 4.46 (needs >=5)' from a devices report ('' if nothing is missing): the core
    packages and those of the optional ``families``."""
    optional = info.get("optional") or {}
    parts = [info] + [optional.get(family) or {} for family in families]
    missing = [name for part in parts for name in part.get("missing") or []]
    outdated = [name for part in parts for name in part.get("outdated") or []]
    return "; ".join(part for part in (", ".join(missing), ", ".join(outdated)) if part)


def pipRequirements(info: Dict[str, Any]) -> List[str]:
    """The pip requirements to install (all but torch) for a devices report; everything when ``info`` is empty."""
    install = info.get("install") if info else None
    if install is None:
        install = list(CORE_REQUIREMENTS.values())
    return [r for r in install if not r.startswith(TORCH + ">") and r != TORCH]


def needsTorch(info: Dict[str, Any]) -> bool:
    install = info.get("install") if info else None
    return install is None or any(r == TORCH or r.startswith(TORCH + ">") for r in install)


def torchVersionRequirement(minimumRequirement: str = ENGINE_REQUIREMENTS[TORCH]) -> str:
    """'>=2.1' from 'torch>=2.1': the form PyTorch Utils appends to 'torch' (``"torch" + torchVersionRequirement``)."""
    minimum = split_requirement(minimumRequirement)[1]
    return f">={minimum}" if minimum else ""


def torchAction(installedVersion: Optional[str], minimumRequirement: str = ENGINE_REQUIREMENTS[TORCH]) -> str:
    """'install' (no torch), 'upgrade' (torch older than the requirement) or 'keep'."""
    if installedVersion is None:
        return "install"
    return "keep" if is_at_least(installedVersion, split_requirement(minimumRequirement)[1]) else "upgrade"


def installTorch(minimumRequirement: str = ENGINE_REQUIREMENTS[TORCH]) -> str:
    """Install or upgrade PyTorch with the PyTorch Utils module (it picks the CUDA build for this GPU) or, without
    it, pip; returns the action taken ('install', 'upgrade', 'keep'). An upgrade of a torch already imported in
    this Slicer session takes effect after a restart. Blocking: PyTorch Utils shows its own progress (the panel
    sends torch to its background pip run instead when PyTorch Utils is absent, see ``installPackages``)."""
    import slicer

    action = torchAction(installed_version(TORCH), minimumRequirement)
    if action == "keep":
        return action
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.installTorch(askConfirmation=False,
                                   torchVersionRequirement=torchVersionRequirement(minimumRequirement)) is None:
            raise RuntimeError("PyTorch could not be installed: see the Python console")
    else:
        slicer.util.pip_install([minimumRequirement])
    return action


def familyRequirements(info: Dict[str, Any], families: Iterable[str]) -> List[str]:
    """The pip requirements of the optional ``families`` (e.g. ['dino']) a devices report says are missing."""
    optional = (info or {}).get("optional") or {}
    return [r for family in families for r in (optional.get(family) or {}).get("install", [])]


def pytorchUtilsAvailable() -> bool:
    """True where Slicer's PyTorch extension (module PyTorchUtils) can install torch."""
    try:
        import PyTorchUtils  # noqa: F401
    except ImportError:
        return False
    return True


#: the line pip prints when it starts writing into site-packages (pip >= 10; unchanged up to pip 26)
PIP_INSTALL_PHASE = "Installing collected packages"


#: ``python -m pip`` with Ctrl+C (SIGINT) turned back on. A process started from a parent that ignores SIGINT
#: (a shell's background job, some launchers and daemons) inherits the ignore, and Python then never raises
#: KeyboardInterrupt: Cancel would find pip deaf, kill it after the grace time, and pip could not clean up.
PIP_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv[0] = 'pip'; runpy.run_module('pip', run_name='__main__', alter_sys=True)")


class PipInstall(EngineProcess):
    """``python -m pip install REQUIREMENTS`` in the background (as ``slicer.util.pip_install`` runs it, without
    blocking Slicer): ``poll()`` from a timer, ``lastLine`` for the progress dialog, ``cancel()`` for its Cancel.

    What Cancel can and cannot undo. pip first resolves and downloads everything ("download" phase: nothing in
    the environment changes), then writes the packages one after another ("install" phase, from the line
    'Installing collected packages'). Cancel in the download phase stops pip (SIGINT, so it removes its
    temporary folders; forced after the grace time): the environment is as it was. Cancel in the install phase
    does not stop pip: it rolls back a package only on errors, not on an interrupt (pip/_internal/req/__init__.py
    ``install_given_reqs`` catches ``Exception``, not ``KeyboardInterrupt``), so stopping it could leave a
    half-written package; it finishes (usually seconds) and ``cancelRequested`` tells the caller to say so.
    Packages installed by then stay installed: pip has no undo across packages (``pip uninstall`` removes them
    but does not bring back versions they replaced).
    """

    STOP_SIGNAL = signal.SIGINT

    def __init__(self, requirements: List[str], python: str) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        super().__init__([python, "-c", PIP_WITH_CTRL_C, "install", "--progress-bar", "off", *requirements], env)
        self.requirements = list(requirements)
        self.phase = "download"
        self.cancelRequested = False
        self.lastLine = ""
        self._seen = 0

    def poll(self) -> List[Dict[str, Any]]:
        """Read new output (never blocks); updates ``phase`` and ``lastLine``. No JSON events: returns []."""
        super().poll()
        for line in self.stdoutLines[self._seen:]:
            if line.strip():
                self.lastLine = line.strip()
            if line.lstrip().startswith(PIP_INSTALL_PHASE):
                self.phase = "install"
        self._seen = len(self.stdoutLines)
        return []

    def cancel(self, graceSeconds: float = CANCEL_GRACE_SECONDS) -> bool:
        """Stop pip if it has not started writing packages; returns True if it is being stopped, False if it is
        left to finish its install step (see the class notes). Returns at once."""
        self.poll()
        self.cancelRequested = True
        if self.phase == "install":
            return False
        super().cancel(graceSeconds)
        return True

    @property
    def cancelled(self) -> bool:
        """Finished because Cancel stopped it (not: cancelled too late, pip completed)."""
        return self.finished and self.cancelRequested and self.returncode != 0 and self.phase == "download"


def startPipInstall(requirements: List[str], python: Optional[str] = None) -> PipInstall:
    """Start ``python -m pip install requirements`` in the background (``python``: PythonSlicer inside Slicer)."""
    return PipInstall(requirements, python or defaultPythonExecutable()).start()


def installPackages(info: Dict[str, Any], families: Iterable[str] = (),
                    python: Optional[str] = None) -> Optional[PipInstall]:
    """Install what a devices report says is missing or too old (all core packages if ``info`` is empty), and the
    missing packages of the optional ``families`` (e.g. ('dino',) when a DINO method is first chosen).

    PyTorch first, through PyTorch Utils when present: that stays a blocking call with its own progress window
    (the extension's UI; it picks the CUDA build). Everything else, and torch where PyTorch Utils is absent, goes
    to one pip run in the background: the returned ``PipInstall`` (None if nothing is left to install)."""
    torch = needsTorch(info)
    if torch and pytorchUtilsAvailable():
        installTorch()
        torch = False
    others = ([ENGINE_REQUIREMENTS[TORCH]] if torch else []) + pipRequirements(info) + familyRequirements(info, families)
    return startPipInstall(others, python) if others else None

"""The engine's Python packages inside Slicer: what is missing (from ``dinoreg devices --json``) and how
to install it. The list of packages and versions is the engine's (``dinoreg.requirements``);
nothing is listed here.
"""

from __future__ import annotations

from typing import Any, Dict, List

from dinoreg.requirements import ENGINE_REQUIREMENTS, TORCH


def missingSummary(info: Dict[str, Any]) -> str:
    """'torch, monai; transformers 4.46 (needs >=5)' from a devices report ('' if nothing is missing)."""
    return "; ".join(part for part in (", ".join(info.get("missing") or []), ", ".join(info.get("outdated") or []))
                     if part)


def pipRequirements(info: Dict[str, Any]) -> List[str]:
    """The pip requirements to install (all but torch) for a devices report; everything when ``info`` is empty."""
    install = info.get("install") if info else None
    if install is None:
        install = list(ENGINE_REQUIREMENTS.values())
    return [r for r in install if not r.startswith(TORCH + ">") and r != TORCH]


def needsTorch(info: Dict[str, Any]) -> bool:
    install = info.get("install") if info else None
    return install is None or any(r == TORCH or r.startswith(TORCH + ">") for r in install)


def installTorch(minimumRequirement: str = ENGINE_REQUIREMENTS[TORCH]) -> None:
    """Install PyTorch with the PyTorch Utils module (it picks the CUDA build for this GPU) or, without it, pip.
    Blocking: Slicer's installers show their own progress."""
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=False) is None:
            raise RuntimeError("PyTorch could not be installed: see the Python console")
    else:
        slicer.util.pip_install([minimumRequirement])


def installPackages(info: Dict[str, Any]) -> None:
    """Install what a devices report says is missing or too old (all engine packages if ``info`` is empty)."""
    import slicer

    if needsTorch(info):
        installTorch()
    others = pipRequirements(info)
    if others:
        slicer.util.pip_install(others)

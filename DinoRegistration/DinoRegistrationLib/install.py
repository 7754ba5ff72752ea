"""The engine's Python packages inside Slicer: what is missing (from ``dinoreg devices --json``) and how
to install it. The list of packages and versions is the engine's (``dinoreg.requirements``);
nothing is listed here.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

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
    this Slicer session takes effect after a restart. Blocking: Slicer's installers show their own progress."""
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


def installPackages(info: Dict[str, Any], families: Iterable[str] = ()) -> None:
    """Install what a devices report says is missing or too old (all core packages if ``info`` is empty), and the
    missing packages of the optional ``families`` (e.g. ('dino',) when a DINO method is first chosen)."""
    import slicer

    if needsTorch(info):
        installTorch()
    others = pipRequirements(info) + familyRequirements(info, families)
    if others:
        slicer.util.pip_install(others)

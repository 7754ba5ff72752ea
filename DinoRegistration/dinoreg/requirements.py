"""The one list of Python packages the engine needs, with minimum versions.

Read by the Slicer module's installer and by ``dinoreg devices`` (what is missing or too old);
``pyproject.toml`` declares the same list for pip (a test keeps the two equal). Standard library
only: this is imported where the engine's packages may be missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from typing import Callable, Dict, List, Optional, Tuple

#: import name -> pip requirement (distribution name and minimum version)
ENGINE_REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.23",
    "scipy": "scipy>=1.9",
    "SimpleITK": "SimpleITK>=2.2",
    "torch": "torch>=2.1",
    "transformers": "transformers>=5",
    "safetensors": "safetensors>=0.4",
    "huggingface_hub": "huggingface_hub>=0.20",
    "matplotlib": "matplotlib>=3.6",
    "PIL": "pillow>=9.2",
    "nibabel": "nibabel>=4.0",
    "tqdm": "tqdm>=4.60",
    "monai": "monai>=1.3",
}

#: installed through Slicer's PyTorch Utils module (which picks the CUDA build), not plain pip
TORCH = "torch"


def split_requirement(requirement: str) -> Tuple[str, Optional[str]]:
    """('name', 'minimum version' or None) of a 'name>=version' requirement."""
    name, _, minimum = requirement.partition(">=")
    return name.strip(), (minimum.strip() or None)


def version_tuple(version: str) -> Tuple[int, ...]:
    """Numeric release part of a version string: '2.13.0+cpu' -> (2, 13, 0), '5.0.0rc1' -> (5, 0, 0)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def is_at_least(installed: str, minimum: Optional[str]) -> bool:
    """True if version ``installed`` is ``minimum`` or newer (a pre-release of ``minimum`` counts as it).

    Written by hand because only '>=' is used and ``packaging`` is not guaranteed in Slicer's Python."""
    if minimum is None:
        return True
    have, need = version_tuple(installed), version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_version(import_name: str) -> Optional[str]:
    """Version of the installed distribution behind ``import_name``, or None if it is not installed."""

    distribution = split_requirement(ENGINE_REQUIREMENTS.get(import_name, import_name))[0]
    for candidate in (distribution, distribution.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def importable(import_name: str) -> bool:
    """True if ``import_name`` can be imported here (without importing it)."""

    try:
        return find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def check_requirements(version_of: Callable[[str], Optional[str]] = installed_version,
                       can_import: Callable[[str], bool] = importable) -> Dict[str, List[str]]:
    """``{"missing": [import names], "outdated": ["name 4.1 (needs >=5)", ...], "install": [pip requirements]}``
    for this Python; ``install`` lists what pip (or PyTorch Utils, for torch) must install.

    A package importable without installation metadata (e.g. one built into Slicer) counts as present:
    its version cannot be checked."""
    missing, outdated, install = [], [], []
    for name, requirement in ENGINE_REQUIREMENTS.items():
        version = version_of(name)
        minimum = split_requirement(requirement)[1]
        if version is None:
            if can_import(name):
                continue
            missing.append(name)
            install.append(requirement)
        elif not is_at_least(version, minimum):
            outdated.append(f"{name} {version} (needs >={minimum})")
            install.append(requirement)
    return {"missing": missing, "outdated": outdated, "install": install}


@dataclass
class Availability:
    """Whether a method can run on this machine, and if not, why and how to enable it."""

    ok: bool
    reason: str = ""

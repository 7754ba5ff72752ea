"""The one list of Python packages the engine needs, with minimum versions.

Read by the Slicer module's installer and by ``dinoreg devices`` (what is missing or too old);
``pyproject.toml`` declares the same list for pip (a test keeps the two equal). Standard library
only: this is imported where the engine's packages may be missing.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from typing import Any, Callable, Dict, List, Optional, Tuple

from dinoreg.errors import InputError

#: import name -> pip requirement (distribution name and minimum version): what every method needs
CORE_REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.23",
    "scipy": "scipy>=1.9",
    "SimpleITK": "SimpleITK>=2.2",
    "torch": "torch>=2.1",
    "safetensors": "safetensors>=0.4",
    "PIL": "pillow>=9.2",
    "nibabel": "nibabel>=4.0",
    "tqdm": "tqdm>=4.60",
}

#: optional package families (pip extras of the same name), installed only when a method of the family is used:
#: "dino" for the DINO feature methods (Hugging Face backbones), "losses" for MONAI's LNCC/Dice losses (training,
#: and the learned methods' instance optimisation with io_similarity=lncc). Each entry may carry a
#: ``python_version`` marker: transformers 5 has no Python 3.9 wheels (Slicer 5.6/5.8 ship Python 3.9), and
#: 4.56 is the first 4.x with DINOv3 (``DINOv3ViTModel``) next to DINOv2 with registers.
EXTRA_REQUIREMENTS: Dict[str, Dict[str, List[str]]] = {
    "dino": {
        "transformers": ['transformers>=4.56; python_version < "3.10"', 'transformers>=5; python_version >= "3.10"'],
        "huggingface_hub": ["huggingface_hub>=0.20"],
    },
    "losses": {"monai": ["monai>=1.3"]},
}


def marker_holds(requirement: str, python: Tuple[int, int] = tuple(sys.version_info[:2])) -> bool:
    """True if the requirement's marker (only ``python_version <op> "X.Y"`` is used here) holds for ``python``."""
    _, _, marker = requirement.partition(";")
    if not marker.strip():
        return True
    match = re.fullmatch(r'\s*python_version\s*(<=|>=|<|>|==|!=)\s*"(\d+)\.(\d+)"\s*', marker)
    if not match:
        raise ValueError(f"unsupported marker in {requirement!r}: only python_version comparisons are used")
    op, wanted = match.group(1), (int(match.group(2)), int(match.group(3)))
    return {"<": python < wanted, "<=": python <= wanted, ">": python > wanted, ">=": python >= wanted,
            "==": python == wanted, "!=": python != wanted}[op]


def for_this_python(requirements: List[str], python: Tuple[int, int] = tuple(sys.version_info[:2])) -> Optional[str]:
    """The one requirement (marker removed) of ``requirements`` whose marker holds for ``python``, or None."""
    for requirement in requirements:
        if marker_holds(requirement, python):
            return requirement.partition(";")[0].strip()
    return None


def declared_requirements() -> Dict[str, List[str]]:
    """``{"": core list, "dino": [...], "losses": [...]}`` as pyproject.toml declares them (markers kept)."""
    declared = {"": list(CORE_REQUIREMENTS.values())}
    for family, packages in EXTRA_REQUIREMENTS.items():
        declared[family] = [r for options in packages.values() for r in options]
    return declared


def family_requirements(family: str) -> Dict[str, str]:
    """import name -> pip requirement for this Python of a family ("" or "core" for the core list)."""
    if family in ("", "core"):
        return dict(CORE_REQUIREMENTS)
    if family not in EXTRA_REQUIREMENTS:
        raise ValueError(f"unknown package family {family!r}: one of core, {', '.join(EXTRA_REQUIREMENTS)}")
    chosen = {name: for_this_python(options) for name, options in EXTRA_REQUIREMENTS[family].items()}
    return {name: requirement for name, requirement in chosen.items() if requirement}


#: import name -> pip requirement for this Python, every family (core first)
ENGINE_REQUIREMENTS: Dict[str, str] = {**CORE_REQUIREMENTS,
                                       **{k: v for f in EXTRA_REQUIREMENTS for k, v in family_requirements(f).items()}}

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
                       can_import: Callable[[str], bool] = importable,
                       families: Tuple[str, ...] = ("core",)) -> Dict[str, Any]:
    """``{"missing": [import names], "outdated": ["name 4.1 (needs >=5)", ...], "install": [pip requirements],
    "optional": {family: {"missing", "outdated", "install"}}}`` for this Python. The top-level keys cover the
    ``families`` asked for (by default the core packages every method needs); ``optional`` reports each optional
    family (see :data:`EXTRA_REQUIREMENTS`) separately, so a missing DINO backbone package never blocks MIND.
    ``install`` lists what pip (or PyTorch Utils, for torch) must install.

    A package importable without installation metadata (e.g. one built into Slicer) counts as present:
    its version cannot be checked."""
    def check(requirements: Dict[str, str]) -> Dict[str, List[str]]:
        missing, outdated, install = [], [], []
        for name, requirement in requirements.items():
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

    asked: Dict[str, str] = {}
    for family in families:
        asked.update(family_requirements(family))
    return {**check(asked), "optional": {family: check(family_requirements(family)) for family in EXTRA_REQUIREMENTS}}


def missing_family_message(family: str, what: str) -> Optional[str]:
    """One line naming the packages of ``family`` missing or too old for ``what`` (e.g. 'DINO features') and the fix,
    or None when the family is complete."""
    report = check_requirements(families=(family,))
    problems = report["missing"] + report["outdated"]
    if not problems:
        return None
    return (f"{what} need{'s' if not what.endswith('s') else ''} {', '.join(problems)}: "
            f"pip install \"dinoreg[{family}]\" (in Slicer: the module installs them when the method is chosen)")


def missing_family_error(family: str, what: str) -> Exception:
    """The InputError to raise when importing a package of optional ``family`` failed (call it in ``except
    ImportError``; the check costs a few metadata look-ups, so it is not run before every import)."""
    return InputError(missing_family_message(family, what)
                      or f"{what}: a package of the '{family}' family does not import: pip install -U \"dinoreg[{family}]\"")


@dataclass
class Availability:
    """Whether a method can run on this machine, and if not, why and how to enable it."""

    ok: bool
    reason: str = ""

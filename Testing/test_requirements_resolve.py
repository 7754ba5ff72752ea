"""The engine's requirement list (core and every optional family) resolves with binary wheels on each Python
the README promises: 3.9 (Slicer 5.6, 5.8) and 3.12 (Slicer 5.10). ``pip install --dry-run`` with
``--python-version`` resolves from the registry's metadata only (no install, ~30-45 s each under load).

Markers are evaluated here for the target Python (pip evaluates them for the running interpreter). torch is
resolved as the plain requirement (not this repository's local CPU pin, which exists for one Python only):
Slicer installs it through PyTorch Utils, and only its metadata is read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DinoRegistration"))
from dinoreg import requirements  # noqa: E402

PROMISED_PYTHONS = [(3, 9), (3, 12)]
UNREACHABLE = ("Could not fetch URL", "NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Network is unreachable", "No matching distribution found for numpy")


def requirement_list(python: tuple[int, int]) -> list[str]:
    """Every requirement (core and optional families) for ``python``, markers evaluated."""
    chosen = []
    for listed in requirements.declared_requirements().values():
        names = {requirements.split_requirement(r.partition(";")[0])[0] for r in listed}
        for name in names:
            options = [r for r in listed if requirements.split_requirement(r.partition(";")[0])[0] == name]
            requirement = requirements.for_this_python(options, python)
            if requirement:
                chosen.append(requirement)
    return sorted(chosen)


def test_markers_choose_a_transformers_with_dinov3_on_python_39():
    assert "transformers>=4.56" in requirement_list((3, 9))  # 4.56 added DINOv3ViTModel; 5.x needs Python >= 3.10
    assert "transformers>=5" in requirement_list((3, 12))
    assert requirements.marker_holds('x>=1; python_version < "3.10"', (3, 9))
    assert not requirements.marker_holds('x>=1; python_version < "3.10"', (3, 10))


@pytest.mark.parametrize("python", PROMISED_PYTHONS, ids=lambda p: f"py{p[0]}{p[1]}")
def test_requirements_resolve_with_wheels(python, tmp_path):
    version = f"{python[0]}.{python[1]}"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--python-version", version, "--target", str(tmp_path / "target"),
               "--report", str(tmp_path / "report.json"), *requirement_list(python)]
    run = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    if run.returncode != 0 and any(sign in run.stderr for sign in UNREACHABLE):
        pytest.skip(f"the package registry is unreachable from here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, f"requirements do not resolve for Python {version}:\n{run.stderr[-3000:]}"
    normalise = lambda name: re.sub(r"[-_.]+", "-", name.lower())  # noqa: E731
    resolved = {normalise(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["install"]}
    for requirement in requirement_list(python):
        name, minimum = requirements.split_requirement(requirement)
        key = normalise(name)
        assert key in resolved, f"{name} missing from the resolution for Python {version}"
        assert requirements.is_at_least(resolved[key], minimum)

"""The Slicer module's installer decisions, headless: PyTorch upgraded through PyTorch Utils when too old, and the
optional package families installed only when asked for (a MIND user never waits for transformers or MONAI)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DinoRegistration"))
from DinoRegistrationLib import install  # noqa: E402


@pytest.fixture
def fake_slicer(monkeypatch):
    """A 'slicer' whose pip_install records its calls, and a PyTorch Utils module with the real signature
    (SlicerPyTorch's PyTorchUtilsLogic.installTorch(askConfirmation, forceComputationBackend,
    torchVersionRequirement, torchvisionVersionRequirement), which runs 'torch' + torchVersionRequirement)."""
    calls = {"pip": [], "torch": []}

    class Logic:
        @staticmethod
        def torchInstalled():
            return True

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls["torch"].append(torchVersionRequirement)
            return types.SimpleNamespace(__version__="2.13.0")

    slicer = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=lambda r: calls["pip"].append(list(r))))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    return calls


def test_an_old_torch_is_upgraded_through_pytorch_utils_with_the_requirement(fake_slicer, monkeypatch):
    monkeypatch.setattr(install, "installed_version", lambda name: "2.0.1", raising=False)
    install.installTorch("torch>=2.1")
    assert fake_slicer["torch"] == [">=2.1"]  # PyTorch Utils runs 'torch>=2.1'


def test_a_recent_torch_is_kept_and_a_missing_one_installed(fake_slicer, monkeypatch):
    assert install.torchAction("2.13.0+cu121", "torch>=2.1") == "keep"
    assert install.torchAction("2.0.1", "torch>=2.1") == "upgrade" and install.torchAction(None) == "install"
    monkeypatch.setattr(install, "installed_version", lambda name: "2.13.0")
    assert install.installTorch("torch>=2.1") == "keep" and fake_slicer["torch"] == []
    monkeypatch.setattr(install, "installed_version", lambda name: None)
    assert install.installTorch("torch>=2.1") == "install" and fake_slicer["torch"] == [">=2.1"]


def test_fresh_environment_installs_core_first_and_a_family_only_when_its_method_is_chosen(fake_slicer, monkeypatch):
    from dinoreg import requirements

    monkeypatch.setattr(install, "installed_version", lambda name: None)
    fresh = requirements.check_requirements(lambda name: None, lambda name: False)
    assert "transformers" not in fresh["missing"] and "monai" not in fresh["missing"]  # core only blocks
    assert fresh["optional"]["dino"]["missing"] == ["transformers", "huggingface_hub"]
    install.installPackages(fresh)  # e.g. MIND chosen: no transformers, no MONAI
    assert fake_slicer["torch"] == [">=2.1"]
    assert not any(r.startswith(("transformers", "monai", "torch")) for r in fake_slicer["pip"][0])
    install.installPackages({**fresh, "missing": [], "install": []}, families=("dino",))
    assert fake_slicer["pip"][1][0].startswith("transformers>=") and "huggingface_hub>=0.20" in fake_slicer["pip"][1]
    install.installPackages({**fresh, "missing": [], "install": []}, families=("losses",))
    assert fake_slicer["pip"][2] == ["monai>=1.3"]


def test_the_engine_names_the_missing_family_and_its_extra(monkeypatch):
    from dinoreg import requirements
    from dinoreg.errors import InputError
    from dinoreg.store.backbones import dino_availability

    monkeypatch.setattr(requirements.check_requirements, "__defaults__",
                        (lambda name: None if name in ("transformers", "monai") else "99", lambda name: False, ("core",)))
    availability = dino_availability()
    assert not availability.ok and 'pip install "dinoreg[dino]"' in availability.reason and "transformers" in availability.reason
    error = requirements.missing_family_error("losses", "MONAI's losses")
    assert isinstance(error, InputError) and "monai" in str(error) and "dinoreg[losses]" in str(error)

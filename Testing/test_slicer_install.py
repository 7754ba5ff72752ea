"""The Slicer module's installer decisions, headless: PyTorch upgraded through PyTorch Utils when too old, and the
optional package families installed only when asked for (a MIND user never waits for transformers or MONAI)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
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

    started = []
    monkeypatch.setattr(install, "installed_version", lambda name: None)
    monkeypatch.setattr(install, "startPipInstall", lambda requirements, python=None: started.append(list(requirements)))
    fresh = requirements.check_requirements(lambda name: None, lambda name: False)
    assert "transformers" not in fresh["missing"] and "monai" not in fresh["missing"]  # core only blocks
    assert fresh["optional"]["dino"]["missing"] == ["transformers", "huggingface_hub"]
    install.installPackages(fresh)  # e.g. MIND chosen: no transformers, no MONAI
    assert fake_slicer["torch"] == [">=2.1"] and fake_slicer["pip"] == []  # torch by PyTorch Utils; no blocking pip
    assert not any(r.startswith(("transformers", "monai", "torch")) for r in started[0])
    install.installPackages({**fresh, "missing": [], "install": []}, families=("dino",))
    assert started[1][0].startswith("transformers>=") and "huggingface_hub>=0.20" in started[1]
    install.installPackages({**fresh, "missing": [], "install": []}, families=("losses",))
    assert started[2] == ["monai>=1.3"]


def test_without_pytorch_utils_torch_goes_to_the_background_pip_run(fake_slicer, monkeypatch):
    started = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails: the extension is not installed
    monkeypatch.setattr(install, "startPipInstall", lambda requirements, python=None: started.append(list(requirements)))
    install.installPackages({"missing": ["torch", "numpy"], "install": ["torch>=2.1", "numpy>=1.24"]})
    assert started == [["torch>=2.1", "numpy>=1.24"]] and fake_slicer["torch"] == [] and fake_slicer["pip"] == []


# ---------------------------------------------------------------------------------------------- pip in the background

FAKE_PIP = """
import os, sys, time
# Stand-in for 'python -m pip install': pip's two phases as pip prints them. DOWNLOAD_SECONDS of resolving and
# downloading (the environment untouched), then 'Installing collected packages', INSTALL_SECONDS of writing, then
# the package's files appear in SITE. On Ctrl+C (SIGINT) pip removes its temporary folders: CLEANED records it.
site, cleaned = os.environ["FAKE_PIP_SITE"], os.environ["FAKE_PIP_CLEANED"]
try:
    print("Collecting " + sys.argv[-1], flush=True)
    for _ in range(int(float(os.environ["DOWNLOAD_SECONDS"]) * 20)):
        time.sleep(0.05)
    print("Installing collected packages: " + sys.argv[-1], flush=True)
    time.sleep(float(os.environ["INSTALL_SECONDS"]))
    open(os.path.join(site, sys.argv[-1] + ".installed"), "w").close()
    print("Successfully installed " + sys.argv[-1], flush=True)
except KeyboardInterrupt:
    open(cleaned, "w").close()
    print("ERROR: Operation cancelled by user", file=sys.stderr, flush=True)
    sys.exit(1)
"""


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """'python -m pip' runs FAKE_PIP (a 'pip' package first on PYTHONPATH); returns (site folder, cleaned marker)."""
    package = tmp_path / "fakepath" / "pip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_PIP)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.setenv("FAKE_PIP_SITE", str(site))
    monkeypatch.setenv("FAKE_PIP_CLEANED", str(tmp_path / "cleaned"))
    return site, tmp_path / "cleaned"


def poll_until(process, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        process.poll()
        time.sleep(0.02)


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a process group: POSIX (Windows forces the stop)")
def test_cancel_while_pip_downloads_stops_it_and_nothing_is_installed(fake_pip, monkeypatch):
    site, cleaned = fake_pip
    monkeypatch.setenv("DOWNLOAD_SECONDS", "120")
    monkeypatch.setenv("INSTALL_SECONDS", "0")
    pip = install.startPipInstall(["tinypkg"], sys.executable)
    poll_until(pip, lambda: pip.lastLine == "Collecting tinypkg")  # the line the dialog shows
    assert pip.phase == "download" and pip.running
    assert pip.cancel() is True  # returns at once
    poll_until(pip, lambda: pip.finished, 30)
    assert pip.cancelled and pip.returncode != 0
    assert list(site.iterdir()) == [] and cleaned.exists()  # nothing installed; SIGINT let pip clean up


def test_cancel_once_pip_writes_packages_lets_it_finish(fake_pip, monkeypatch):
    site, cleaned = fake_pip
    monkeypatch.setenv("DOWNLOAD_SECONDS", "0")
    monkeypatch.setenv("INSTALL_SECONDS", "1")
    pip = install.startPipInstall(["tinypkg"], sys.executable)
    poll_until(pip, lambda: pip.phase == "install")
    assert pip.cancel() is False  # not interrupted half-way through writing a package
    poll_until(pip, lambda: pip.finished, 30)
    assert pip.returncode == 0 and pip.cancelRequested and not pip.cancelled
    assert (site / "tinypkg.installed").exists() and not cleaned.exists()


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a process group: POSIX")
def test_real_pip_cancelled_while_waiting_for_its_index_leaves_no_trace(tmp_path, monkeypatch):
    """The real pip of this Python, pointed at a local index that never answers (no network needed): Cancel stops
    it, nothing lands in the target folder and pip's temporary folders are gone (SIGINT, not SIGTERM)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)  # accepts connections, never answers
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # only the stalled index (no machine-wide extra indexes)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    target = tmp_path / "target"
    index = f"http://127.0.0.1:{server.getsockname()[1]}/simple"
    pip = install.startPipInstall(["--index-url", index, "--target", str(target), "--retries", "0", "--timeout", "120",
                                   "tinypkg"], sys.executable)
    try:
        poll_until(pip, lambda: any("Looking in indexes" in line for line in pip.stdoutLines) or pip.finished)
        time.sleep(1.0)  # pip is now waiting for the index
        assert pip.running and pip.phase == "download"
        assert pip.cancel() is True
        poll_until(pip, lambda: pip.finished, 30)
    finally:
        pip.cancel(graceSeconds=0)
        server.close()
    assert pip.cancelled
    assert not target.exists() or list(target.iterdir()) == []
    assert [p.name for p in temp.iterdir()] == []


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


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a process group: POSIX (Windows forces the stop)")
def test_cancel_reaches_pip_even_when_the_parent_ignores_ctrl_c(fake_pip, monkeypatch):
    """A parent that ignores SIGINT (a shell's background job) passes the ignore on: pip must still get Ctrl+C."""
    site, cleaned = fake_pip
    monkeypatch.setenv("DOWNLOAD_SECONDS", "120")
    monkeypatch.setenv("INSTALL_SECONDS", "0")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pip = install.startPipInstall(["tinypkg"], sys.executable)
    finally:
        signal.signal(signal.SIGINT, previous)
    poll_until(pip, lambda: pip.lastLine == "Collecting tinypkg")
    assert pip.cancel() is True
    poll_until(pip, lambda: pip.finished, 30)
    assert pip.cancelled and cleaned.exists() and list(site.iterdir()) == []  # pip's own clean-up ran

"""Security: nothing downloaded is unpickled, downloads are checked against SHA-256, subprocesses
get argument lists (never a shell), temporary files and folders are private to the user."""

from __future__ import annotations

import ast
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from dinoreg.store.downloads import check_recorded_hash, download_verified, verify_hub_snapshot
from dinoreg.errors import InputError

SOURCES = sorted(p for folder in ("DinoRegistration", "benchmarks") for p in (REPO / folder).rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_sources_found():
    assert len(SOURCES) > 20 and any(p.name == "pipeline.py" for p in SOURCES)


def unsafe_calls(text: str) -> list[str]:
    """No pickle, no torch.load without weights_only=True, no np.load(allow_pickle=True), no shell,
    no os.system, no tempfile.mktemp, no yaml.load, no eval/exec."""
    tree = ast.parse(text)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(name and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for name in names):
                problems.append(f"line {node.lineno}: imports a pickle library")
    for node, name in calls(tree):
        where = f"line {node.lineno}: {name}"
        if name.endswith("torch.load"):
            value = keyword(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where} without weights_only=True")
        if name in ("np.load", "numpy.load"):
            value = keyword(node, "allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{where} with allow_pickle")
        value = keyword(node, "shell")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            problems.append(f"{where} with shell=")
        if name in ("os.system", "os.popen", "tempfile.mktemp", "yaml.load", "eval", "exec"):
            problems.append(where)
        if name.startswith("subprocess.") and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
            problems.append(f"{where} with a command string instead of an argument list")
    return problems


def test_the_scan_finds_unsafe_calls():
    bad = ("import pickle\nimport torch, subprocess, numpy as np, tempfile\ntorch.load('w.pt')\n"
           "np.load('a.npz', allow_pickle=True)\nsubprocess.run('ls', shell=True)\ntempfile.mktemp()\n")
    assert len(unsafe_calls(bad)) == 6
    assert unsafe_calls("import torch\ntorch.load('w.pt', weights_only=True)\n") == []


#: files allowed one finding, with the reason (each is a local file this program wrote itself)
ALLOWED = {
    "DinoRegistration/dinoreg/training/checkpoint.py":
        "torch.load(weights_only=False) resumes this machine's own training checkpoint (optimizer state), never a download",
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_calls(path):
    problems = unsafe_calls(path.read_text(encoding="utf-8"))
    if str(path.relative_to(REPO)) in ALLOWED:
        assert len(problems) <= 1, problems
        return
    assert not problems


def test_every_download_is_verified():
    """Modules that fetch files use downloads.py (SHA-256) or verify a hub snapshot after it."""
    fetchers = ("download_url_to_file", "urlretrieve", "urlopen", "hf_hub_download", "snapshot_download", "requests.get")
    for path in SOURCES:
        if path.name == "downloads.py":
            continue
        text = path.read_text(encoding="utf-8")
        fetched = [name for _, name in calls(ast.parse(text)) if name.split(".")[-1] in fetchers or name in fetchers]
        if "snapshot_download" in " ".join(fetched) or "hf_hub_download" in " ".join(fetched):
            assert "verify_hub_snapshot(" in text, f"{path}: hub download without SHA-256 check"
        others = [name for name in fetched if name.split(".")[-1] not in ("snapshot_download", "hf_hub_download")]
        hashes = "download_verified(" in text or ("sha256" in text.lower() and ("hashlib" in text or "sha256_of(" in text))
        assert not others or hashes, f"{path}: {others} download without SHA-256 check (use downloads.download_verified)"


def test_download_verified_checks_the_hash_and_keeps_nothing_on_mismatch(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(np.random.default_rng(0).bytes(3000))
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "weights.bin"
    with pytest.raises(InputError, match="SHA-256"):
        download_verified(source.as_uri(), target, "0" * 64)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    download_verified(source.as_uri(), target, good)
    assert target.read_bytes() == source.read_bytes()
    check_recorded_hash(target)
    target.write_bytes(b"tampered")
    with pytest.raises(InputError, match="no longer matches"):
        check_recorded_hash(target)


def test_hub_snapshot_blobs_are_checked(tmp_path):
    """Hub snapshots link file names to blobs named by their SHA-256; a changed blob is refused."""
    content = b"safetensors bytes"
    blob = tmp_path / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(content)
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    (snapshot / "config.json").write_text("{}")
    verify_hub_snapshot(snapshot)
    blob.write_bytes(b"tampered bytes")
    with pytest.raises(InputError, match="model.safetensors"):
        verify_hub_snapshot(snapshot)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_staging_folder_and_temporary_files_are_private(tmp_path, monkeypatch):
    """Results are assembled in a 0700 folder; temporary files are created 0600 (mkstemp)."""
    from dinoreg.app import outputs
    from dinoreg.app.pipeline import RegistrationOptions, register
    from dinoreg.core.volume import Grid, Volume

    modes = {}
    original_write_files = outputs.write_files

    def spy_write_files(result, folder, inputs):
        modes["staging"] = stat.S_IMODE(folder.stat().st_mode)
        return original_write_files(result, folder, inputs)

    def spy_mkstemp(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        modes.setdefault("temporary files", set()).add(stat.S_IMODE(os.stat(name).st_mode))
        return handle, name

    import tempfile

    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(outputs, "write_files", spy_write_files)
    monkeypatch.setattr(tempfile, "mkstemp", spy_mkstemp)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 22, 24)), indexing="ij")
    volume = Volume((1000 * np.exp(-3 * (i * i + j * j + k * k))).astype(np.float32), Grid((24, 22, 20), spacing=(3, 3, 3)))
    result = register(volume, volume, RegistrationOptions(method="identity", device="cpu"))
    outputs.write_outputs(result, tmp_path / "out")
    assert modes["staging"] == 0o700
    assert modes["temporary files"] == {0o600}

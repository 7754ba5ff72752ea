"""Faults: cancel at every stage, the engine process terminated or killed, GPU out of memory, the
disk filling up. In every case the inputs are untouched and no partial output folder appears."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DEMO, REPO
from dinoreg.app import pipeline
from dinoreg.errors import Cancelled
from dinoreg.io.volumes import read_volume
from dinoreg.methods.base import registry
from dinoreg.app.outputs import write_outputs
from dinoreg.app.pipeline import RegistrationOptions, register
from dinoreg.progress import Progress

FIXED, MOVING = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"
FAST = {"adam_iterations": 5}


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def stages_of(method: str) -> list[str]:
    """The stage names a run of ``method`` on the demo pair goes through, in order."""
    seen: list[str] = []
    progress = Progress(lambda stage, fraction, left: seen.append(stage) if stage not in seen else None)
    register(read_volume(FIXED), read_volume(MOVING), RegistrationOptions(method=method, device="cpu", params=FAST), progress=progress)
    return [stage for stage in seen if stage not in ("starting", "done")]


def test_cancel_at_every_stage_raises_and_returns_nothing():
    fixed, moving = read_volume(FIXED), read_volume(MOVING)
    stages = stages_of("mind-zeroshot")
    assert {"affine", "warping", "inverse", "jacobian"} <= set(stages) and len(stages) >= 6
    for target in stages:
        progress = Progress()
        progress.callback = lambda stage, fraction, left, target=target: progress.cancel() if stage == target else None
        with pytest.raises(Cancelled):
            register(fixed, moving, RegistrationOptions(method="mind-zeroshot", device="cpu", params=FAST), progress=progress)
        assert progress.stage_name in (target, *stages[stages.index(target) + 1:]), target


def test_interrupted_writing_leaves_no_folder(tmp_path, monkeypatch):
    result = register(read_volume(FIXED), read_volume(MOVING), RegistrationOptions(method="affine", device="cpu"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dinoreg.app.outputs.write_preview", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def cli_process(outdir: Path, *extra: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "dinoreg", "register", str(FIXED), str(MOVING), "-o", str(outdir),
               "--method", "mind-zeroshot", "--progress-json", "--device", "cpu", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO / "DinoRegistration"), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL])
def test_engine_process_terminated_or_killed_mid_run(tmp_path, signal_number):
    before = digest(FIXED, MOVING)
    outdir = tmp_path / "out"
    process = cli_process(outdir)
    for line in process.stdout:  # wait until the method itself runs
        event = json.loads(line)
        if event.get("event") == "progress" and event["stage"] not in ("starting", "affine"):
            break
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    if signal_number == signal.SIGTERM:
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1].startswith("dinoreg: error: registration stopped (terminated)")
        assert "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder
    assert digest(FIXED, MOVING) == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_engine_process_terminated_during_the_background_affine_stage(tmp_path):
    """The command line runs the affine stage in a thread while torch loads: a SIGTERM then stops
    that thread before the process exits (exit 130, one line, nothing written; ITK still running in
    a thread at exit aborted the process with status 134)."""
    outdir = tmp_path / "out"
    process = cli_process(outdir)
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["stage"] == "affine":
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-500:]
    assert stderr.strip().splitlines()[-1].startswith("dinoreg: error: registration stopped (terminated)")
    assert "Traceback" not in stderr and "terminate called" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="resource.RLIMIT_FSIZE is POSIX")
def test_disk_full_while_writing(tmp_path):
    """A file-size limit makes every write past 20 kB fail (EFBIG), as a full disk would."""
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    before = digest(FIXED, MOVING)
    process = cli_process(tmp_path / "out", "--param", "adam_iterations=5", preexec_fn=limit_file_size)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("dinoreg: error: cannot write the outputs: ") and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
    assert digest(FIXED, MOVING) == before


def test_gpu_out_of_memory_falls_back_to_cpu(monkeypatch):
    """A fake CUDA device whose method run raises torch's OutOfMemoryError: the run finishes on the CPU."""
    method_class = registry()["mind-zeroshot"]
    original_run = method_class.run
    devices = []

    def run_out_of_memory_on_cuda(self, problem, initial):
        devices.append(problem.device.type)
        if problem.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_run(self, problem, initial)

    monkeypatch.setattr(method_class, "run", run_out_of_memory_on_cuda)
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("cuda"))
    for name, value in (("reset_peak_memory_stats", None), ("empty_cache", None), ("max_memory_allocated", 0),
                        ("get_device_name", "fake GPU")):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value, **kwargs: value)
    with pytest.warns(RuntimeWarning, match="out of GPU memory; continuing on the CPU"):
        result = register(read_volume(FIXED), read_volume(MOVING), RegistrationOptions(method="mind-zeroshot", params=FAST))
    assert devices == ["cuda", "cpu"]
    assert result.report["device"].startswith("cpu")
    assert result.report["similarity_after"]["ncc"] > result.report["similarity_before"]["ncc"]


def test_failed_batch_pair_leaves_nothing_and_others_finish(tmp_path):
    """A pair whose writing fails (its folder name is blocked by a file) fails alone."""
    from dinoreg.app.batch import read_pairs, run_batch

    table = tmp_path / "pairs.csv"
    table.write_text(f"fixed,moving\n{FIXED},{MOVING}\n{MOVING},{FIXED}\n")
    pairs = read_pairs(table, "affine")
    outdir = tmp_path / "out"
    run_batch([], outdir)  # a batch folder of ours (a foreign non-empty folder is refused as a whole)
    (outdir / pairs[0].name).write_text("a file where the pair's folder goes")
    rows = run_batch(pairs, outdir)
    assert rows[0]["status"] == "failed" and "is a file" in rows[0]["reason"]
    assert rows[1]["status"].startswith("ok")
    assert not [p for p in outdir.iterdir() if p.name.startswith(".") and p.name != ".dinoreg-output.json"]

"""Background processes as the panel runs them, and the JSON progress protocol they speak (defined once in
dinoreg.progress, written by the CLI and read by the panel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
sys.path.insert(0, str(MODULE_DIR))

from dinoreg.progress import done_event, error_event, format_event, parse_event, progress_event

ENV = {**os.environ, "PYTHONPATH": str(MODULE_DIR)}


def cli(*args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinoreg", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def test_events_round_trip_and_other_lines_are_not_events():
    for event in (progress_event("features", 1.7, 12.345), progress_event("download", None, None),
                  done_event(outdir="/x"), error_event("bad input: fix it")):
        line = format_event(event)
        assert "\n" not in line and parse_event(line) == event
    assert progress_event("features", 1.7, 12.345)["fraction"] == 1.0
    for line in ("", "downloading ...", "{not json}", '{"no_event": 1}', "[1, 2]"):
        assert parse_event(line) is None


def test_cli_progress_json_is_the_protocol(tmp_path):
    demo = REPO / "Resources" / "Demo"
    out = cli("register", str(demo / "MRBrainTumor1.nii.gz"), str(demo / "MRBrainTumor2.nii.gz"), "-o",
              str(tmp_path / "out"), "--method", "identity", "--no-affine", "--no-inverse", "--no-jacobian",
              "--progress-json", timeout=300)
    assert out.returncode == 0, out.stderr
    events = [parse_event(line) for line in out.stdout.splitlines()]
    assert events and None not in events  # every stdout line is an event
    assert events[-1] == done_event(outdir=str(tmp_path / "out"))
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_weights_download_speaks_the_protocol_and_fails_in_one_line():
    out = cli("weights", "download", "no-such-model", "--progress-json")
    events = [parse_event(line) for line in out.stdout.splitlines()]
    assert out.returncode == 2 and None not in events
    assert events[0]["event"] == "progress" and events[-1]["event"] == "error"
    assert "no-such-model" in events[-1]["message"]


def test_download_watcher_reports_bytes_arriving(tmp_path):
    from dinoreg.progress import DownloadWatcher

    events = []
    with DownloadWatcher([tmp_path], total_bytes=4000, stage="downloading x", interval=0.05, emit=events.append):
        for index in range(4):
            (tmp_path / f"part{index}").write_bytes(b"x" * 1000)
            time.sleep(0.15)
    fractions = [e["fraction"] for e in events]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any(0.2 < f < 1.0 for f in fractions)
    unknown = []
    with DownloadWatcher([tmp_path], total_bytes=None, stage="downloading y", interval=0.05, emit=unknown.append):
        pass
    assert unknown[0]["fraction"] is None and "MB" in unknown[0]["stage"]


def test_devices_reports_gpus_and_packages_and_survives_a_broken_torch(tmp_path):
    out = cli("devices", "--json")
    info = json.loads(out.stdout)
    assert out.returncode == 0 and info["torch"] and info["missing"] == [] and info["cuda"] == []
    broken = tmp_path / "broken"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object')\n")
    out = cli("devices", "--json", env={**ENV, "PYTHONPATH": os.pathsep.join([str(broken), str(MODULE_DIR)])})
    info = json.loads(out.stdout)
    assert out.returncode == 0 and "libtorch_cpu.so" in info["torch_error"] and info["torch"] is None


STUBBORN = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an engine stuck in C code does not stop on SIGTERM
    print('{"event": "progress", "stage": "busy", "fraction": 0.1, "seconds_left": null}', flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_cancel_returns_at_once_and_polling_forces_the_stop():
    """The panel cancels from the main thread: ``cancel()`` must not wait for the engine (it used to wait
    up to 8 s); the forced stop comes from ``poll()`` (the panel's timer) after the grace time."""
    pytest.importorskip("slicer")
    from DinoRegistrationLib.process import EngineProcess

    process = EngineProcess([sys.executable, "-c", STUBBORN]).start()
    deadline = time.monotonic() + 30
    while not process.stdoutLines and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.02)
    started = time.monotonic()
    process.cancel(graceSeconds=0.5)
    assert time.monotonic() - started < 0.1
    assert process.process.poll() is None  # ignored SIGTERM: still running, and nobody waited
    assert process.wait(5) and process.returncode != 0
    assert time.monotonic() - started < 3.0


def test_background_output_is_read_without_blocking_the_caller():
    pytest.importorskip("slicer")
    from DinoRegistrationLib.process import EngineProcess

    process = EngineProcess([sys.executable, "-c", "import time; time.sleep(2); print('{\"event\": \"done\"}')"]).start()
    started = time.monotonic()
    assert process.poll() == [] and time.monotonic() - started < 0.1
    assert process.wait(30) and process.jsonOutput() == {"event": "done"}

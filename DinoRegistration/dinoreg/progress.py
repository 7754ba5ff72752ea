"""Progress reporting and cancellation, shared by the CLI bar, the Slicer panel and the API.

The pipeline declares its stages with weights (relative expected durations); code inside a stage
calls :meth:`Progress.update` with the fraction of that stage done, and :meth:`Progress.check`
at safe points so a cancel request stops the run promptly by raising ``Cancelled``.

The JSON event protocol (``--progress-json``) is defined here once, for the CLI that writes it and the
Slicer module that reads it. One event per stdout line, a JSON object with an ``event`` key:

- ``{"event": "progress", "stage": str, "fraction": 0..1 overall | null, "seconds_left": float | null}``
- ``{"event": "done", "outdir": str}`` (or any other keys the command reports)
- ``{"event": "error", "message": str}``: one line for the user

Light on purpose: standard library only, so ``import`` costs nothing in Slicer or the CLI.
:class:`DownloadWatcher` reports a download's progress in the same protocol.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

from dinoreg.errors import Cancelled

# callback(stage name, overall fraction in [0, 1], estimated seconds left or None)
ProgressCallback = Callable[[str, float, "float | None"], None]


class Progress:
    """Tracks the current stage and the overall fraction done; thread-safe cancel flag."""

    def __init__(self, callback: ProgressCallback | None = None, cancel_event: threading.Event | None = None) -> None:
        self.callback = callback
        self.cancel_event = cancel_event or threading.Event()
        self.weights: dict[str, float] = {}
        self.done_weight = 0.0
        self.stage_name = "starting"
        self.stage_fraction = 0.0
        self.start_time = time.perf_counter()
        self.stage_start = self.start_time
        self.stage_seconds: dict[str, float] = {}

    def plan(self, weights: dict[str, float]) -> None:
        """Declare the stages to come and their relative expected durations."""
        self.weights = dict(weights)

    def stage(self, name: str) -> None:
        """Start stage ``name`` (closing the previous one); a pending cancel stops the run here."""
        self.check()
        self._close_stage()
        self.stage_name = name
        self.stage_fraction = 0.0
        self.stage_start = time.perf_counter()
        self._emit()

    def update(self, fraction: float, check: bool = True) -> None:
        """Fraction (0..1) of the current stage done; also checks for cancellation unless
        ``check`` is False (for callbacks inside C++ code, where raising is not allowed)."""
        self.stage_fraction = min(max(float(fraction), 0.0), 1.0)
        self._emit()
        if check:
            self.check()

    def check(self) -> None:
        """Raise ``Cancelled`` if a cancel was requested."""
        if self.cancel_event.is_set():
            raise Cancelled("registration cancelled by the user")

    def cancel(self) -> None:
        self.cancel_event.set()

    def finish(self) -> None:
        self.check()  # a cancel during the last stage discards the result
        self._close_stage()
        self.stage_name = "done"
        self._emit(force_fraction=1.0)

    def overall_fraction(self) -> float:
        total = sum(self.weights.values()) or 1.0
        current = self.weights.get(self.stage_name, 0.0) * self.stage_fraction
        return min(1.0, (self.done_weight + current) / total)

    def _close_stage(self) -> None:
        if self.stage_name not in ("starting", "done"):
            elapsed = time.perf_counter() - self.stage_start
            self.stage_seconds[self.stage_name] = self.stage_seconds.get(self.stage_name, 0.0) + elapsed
            self.done_weight += self.weights.get(self.stage_name, 0.0)

    def _emit(self, force_fraction: float | None = None) -> None:
        if self.callback is None:
            return
        fraction = self.overall_fraction() if force_fraction is None else force_fraction
        elapsed = time.perf_counter() - self.start_time
        remaining = elapsed * (1.0 - fraction) / fraction if fraction > 0.02 else None
        self.callback(self.stage_name, fraction, remaining)


# ---------------------------------------------------------------------------------------------- JSON protocol

PROGRESS, DONE, ERROR = "progress", "done", "error"


def progress_event(stage: str, fraction: Optional[float], seconds_left: Optional[float]) -> Dict[str, Any]:
    """A progress event: ``fraction`` of the whole command done (clamped to 0..1; None when unknown, e.g. a
    download of unknown size), time left in seconds (None when unknown)."""
    return {"event": PROGRESS, "stage": str(stage),
            "fraction": None if fraction is None else round(min(max(float(fraction), 0.0), 1.0), 4),
            "seconds_left": None if seconds_left is None else round(float(seconds_left), 1)}


def done_event(**fields: Any) -> Dict[str, Any]:
    return {"event": DONE, **fields}


def error_event(message: str) -> Dict[str, Any]:
    return {"event": ERROR, "message": str(message)}


def format_event(event: Dict[str, Any]) -> str:
    """The event as one line of JSON (no newline inside)."""
    return json.dumps(event, default=str)


def print_event(event: Dict[str, Any]) -> None:
    """Write one event line on stdout and flush it (the reader polls line by line)."""
    print(format_event(event), flush=True)


def parse_event(line: str) -> Optional[Dict[str, Any]]:
    """The event on one line of output, or None for any other line."""
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# ---------------------------------------------------------------------------------------------- downloads

class DownloadWatcher:
    """Context manager printing JSON progress events every ``interval`` seconds while a download runs
    (``dinoreg weights download --progress-json``; any other download can use it the same way).

    Progress is the growth of the bytes stored under ``folders`` (the downloaders write there), against
    ``total_bytes`` when known (the fraction is None otherwise, and the panel shows a busy bar). Watching
    the folders works for every downloader (Hugging Face hub, torch.hub) without hooking into them.
    """

    def __init__(self, folders: Iterable[Path], total_bytes: Optional[float], stage: str, interval: float = 0.5,
                 emit: Optional[Callable[[dict], None]] = None) -> None:
        self.folders, self.total, self.stage, self.interval = [Path(f) for f in folders], total_bytes, stage, interval
        self.emit = emit or print_event
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "DownloadWatcher":
        self.start_bytes, self.start_time = self.stored_bytes(), time.monotonic()
        self.report()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        if exc[0] is None:
            self.emit(progress_event(self.stage, 1.0, 0.0))

    def stored_bytes(self) -> int:
        total = 0
        for folder in self.folders:
            for root, _, files in os.walk(folder):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_size
                    except OSError:
                        pass  # a file renamed or removed by the downloader meanwhile
        return total

    def report(self) -> None:
        arrived = max(0, self.stored_bytes() - self.start_bytes)
        if not self.total:
            self.emit(progress_event(f"{self.stage} ({arrived / 2**20:.0f} MB)", None, None))
            return
        fraction = min(arrived / self.total, 0.99)
        elapsed = time.monotonic() - self.start_time
        left = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        self.emit(progress_event(self.stage, fraction, left))

    def _watch(self) -> None:
        while not self.stopped.wait(self.interval):
            self.report()

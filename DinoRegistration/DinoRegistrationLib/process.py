"""A command running in the background, polled from Slicer's main thread without ever blocking it.

Output is read by two threads into a queue; :meth:`EngineProcess.poll` (called from a QTimer in the
panel, or a loop in headless code) collects it, so Qt and MRML are only touched on the main thread.
Lines of stdout that are JSON events (:mod:`dinoreg.progress`) become event dicts.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from dinoreg.progress import parse_event

#: seconds between the polite stop (SIGTERM) and the forced one (SIGKILL) after ``cancel()``
CANCEL_GRACE_SECONDS = 3.0


class EngineProcess:
    """A background command. stdout lines that are JSON events are returned by ``poll()``; every
    stdout line is kept in ``stdoutLines``, the last 300 stderr lines in ``stderrTail``.

    ``cancel()`` first sends ``STOP_SIGNAL`` to the process group (POSIX: SIGTERM here; pip gets SIGINT, on which
    it removes its temporary folders), then SIGKILL after the grace time. On Windows the stop is always forced."""

    STOP_SIGNAL = signal.SIGTERM

    def __init__(self, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.command = command
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.stdoutLines: List[str] = []
        self.stderrTail: collections.deque = collections.deque(maxlen=300)
        self.killAt: Optional[float] = None  # monotonic time of the forced stop after a cancel
        self._lines: "queue.Queue[tuple]" = queue.Queue()
        self._threads: List[threading.Thread] = []

    def start(self) -> "EngineProcess":
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: cancel stops launcher and engine
        logging.info("DinoRegistration: running %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env, text=True, encoding="utf-8",
                                        errors="replace", bufsize=1, **kwargs)
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def running(self) -> bool:
        return self.process is not None and not self.finished

    def poll(self) -> List[Dict[str, Any]]:
        """New events since the last call (never blocks). Sets ``returncode`` once the process ended and
        all its output was read; after ``cancel()``, forces the stop once the grace time is over."""
        if self.process is None or self.finished:
            return []
        if self.killAt is not None and time.monotonic() >= self.killAt and self.process.poll() is None:
            self._signal(kill=True)
            self.killAt = None
        ended = self.process.poll() is not None and not any(t.is_alive() for t in self._threads)
        events = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if name == "err":
                self.stderrTail.append(line)
                continue
            self.stdoutLines.append(line)
            event = parse_event(line)
            if event is not None:
                events.append(event)
        if ended:
            self.returncode = self.process.returncode
        return events

    def cancel(self, graceSeconds: float = CANCEL_GRACE_SECONDS) -> None:
        """Ask the process (and its children) to stop, and return at once. ``poll()`` forces the stop
        after ``graceSeconds`` if it is still running; ``graceSeconds=0`` forces it now."""
        if self.process is None or self.process.poll() is not None:
            return
        if graceSeconds <= 0:
            self._signal(kill=True)
            return
        self._signal(kill=False)
        if self.killAt is None:
            self.killAt = time.monotonic() + graceSeconds

    def _signal(self, kill: bool) -> None:
        try:
            if os.name == "nt":  # taskkill returns at once; it stops the whole tree
                subprocess.Popen(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
            else:
                os.killpg(self.process.pid, signal.SIGKILL if kill else self.STOP_SIGNAL)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block (polling) until finished or ``timeout`` seconds passed; True if finished.
        For scripts and tests only: the panel polls from its timer instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def log(self) -> str:
        """stderr tail (and non-event stdout) for error details."""
        other = [line for line in self.stdoutLines if parse_event(line) is None]
        return "\n".join(list(self.stderrTail) + other[-50:])

    def jsonOutput(self) -> Any:
        """The JSON document a finished process printed (from its first ``{`` or ``[``), or None."""
        import json

        text = "\n".join(self.stdoutLines).strip()
        start = min([i for i in (text.find("{"), text.find("[")) if i >= 0], default=-1)
        if self.returncode != 0 or start < 0:
            return None
        try:
            return json.loads(text[start:])
        except ValueError:
            return None

    def lastErrorLine(self) -> str:
        """The last non-empty stderr line without its 'error:' prefix (the engine's one-line message)."""
        lines = [line.strip() for line in self.stderrTail if line.strip()]
        if not lines:
            return ""
        last = lines[-1]
        for prefix in ("dinoreg: error:", "error:"):
            if last.startswith(prefix):
                return last[len(prefix):].strip()
        return last


def unexpectedExitMessage(code: Optional[int], log: str) -> str:
    """One line for an engine that ended without reporting an error event (crash, missing package)."""
    marker = "No module named "
    if marker in log:
        package = log.split(marker, 1)[1].split()[0].strip("'\"").split(".")[0]
        return (f"The engine needs the Python package '{package}', which is not installed: use 'Install packages' "
                "in the Setup section.")
    return f"The registration process stopped unexpectedly (exit code {code}); the Python console shows its log."


def formatSeconds(seconds: Optional[float]) -> str:
    """'1 min 05 s' style text for a time left (empty if unknown)."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def defaultPythonExecutable() -> str:
    """PythonSlicer inside Slicer (a Python with Slicer's packages), else this Python."""
    import slicer

    if hasattr(slicer, "app"):
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
        if os.path.exists(found):
            return found
    return sys.executable

"""Progress reporting and cancellation, shared by the CLI bar, the Slicer panel and the API.

The pipeline declares its stages with weights (relative expected durations); code inside a stage
calls :meth:`Progress.update` with the fraction of that stage done, and :meth:`Progress.check`
at safe points so a cancel request stops the run promptly by raising ``Cancelled``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .errors import Cancelled

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

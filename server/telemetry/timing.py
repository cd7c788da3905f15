"""``Timer``: per-stage wall-clock timings of one request, reported in its response."""

from __future__ import annotations

import time


class Timer:
    """Per-stage wall-clock timings in milliseconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str, started: float) -> None:
        """Add the time since ``started`` (a ``time.perf_counter()`` reading) to stage ``name``."""
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - started) * 1000.0

    def total(self) -> dict[str, float]:
        """Every stage's time and the ``total`` since the timer started."""
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings

"""``Timer``: per-stage wall-clock timings of one request, reported in its response and to its telemetry record."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .record import current


class Timer:
    """Per-stage wall-clock timings in milliseconds.

    Every stage is also added to the current request's record (``record.current``), from which the
    stage histograms and the access log read, so the services time their stages in this one place.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str, started: float) -> None:
        """Add the time since ``started`` (a ``time.perf_counter()`` reading) to stage ``name``."""
        ms = (time.perf_counter() - started) * 1000.0
        self.timings[name] = self.timings.get(name, 0.0) + ms
        record = current()
        if record is not None:
            record.stage(name, ms)

    def report(self, degraded: Sequence[str]) -> dict[str, float]:
        """Every stage's time and the ``total`` since the timer started, for the response; the stages that
        ``degraded`` (skipped or replaced) go to the request's record."""
        record = current()
        if record is not None:
            record.degraded.extend(stage for stage in degraded if stage not in record.degraded)
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings

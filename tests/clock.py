"""A fake monotonic clock for code that takes its clock from the caller."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    """Stands still at ``now`` until a test moves it forward (``clock.now += seconds``)."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

"""Progress of an ingestion run: documents, chunks, chunks/s and ETA, as one line for a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Counts of an ingestion over ``total`` documents, fed by ``advance`` (increments) or ``update`` (totals)."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.chunks = 0
        self._clock = clock
        self._started = clock()

    def advance(self, documents: int, chunks: int = 0, failed: int = 0) -> None:
        """``documents`` more were upserted, writing ``chunks`` chunks; ``failed`` more failed."""
        self.update(self.done + documents, self.failed + failed, self.chunks + chunks)

    def update(self, done: int, failed: int = 0, chunks: int | None = None) -> None:
        """Set the counts, e.g. from a job's ``JobInfo`` (which does not count chunks)."""
        self.done, self.failed = done, failed
        if chunks is not None:
            self.chunks = chunks

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    @property
    def chunks_per_s(self) -> float:
        elapsed = self.elapsed_s
        return self.chunks / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None before anything is settled."""
        settled = self.done + self.failed
        if settled == 0 or self.elapsed_s <= 0:
            return None
        return max(0, self.total - settled) * self.elapsed_s / settled

    def line(self) -> str:
        """E.g. ``120/500 documents (3 failed), 1450 chunks, 85.2 chunks/s, ETA 0:04:27``."""
        failed = f" ({self.failed} failed)" if self.failed else ""
        eta = self.eta_s
        parts = [
            f"{self.done + self.failed}/{self.total} documents{failed}",
            f"{self.chunks} chunks",
            f"{self.chunks_per_s:.1f} chunks/s",
            f"ETA {duration(eta)}" if eta is not None else "ETA --:--:--",
        ]
        return ", ".join(parts)

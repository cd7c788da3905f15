"""Progress line: counts, rate and ETA on a fake clock."""

from __future__ import annotations

from tests.clock import FakeClock
from tritonrag.clients.progress import Progress


def test_rate_and_eta_follow_the_pace_so_far() -> None:
    clock = FakeClock()
    progress = Progress(500, clock)
    assert progress.line() == "0/500 documents, 0 chunks, 0.0 chunks/s, ETA --:--:--"
    clock.now += 10
    progress.advance(100, chunks=850, failed=0)
    progress.advance(17, chunks=0, failed=3)
    assert progress.chunks_per_s == 85.0
    assert progress.eta_s == 380 * 10 / 120
    assert progress.line() == "120/500 documents (3 failed), 850 chunks, 85.0 chunks/s, ETA 0:00:32"


def test_update_sets_totals_from_a_job() -> None:
    clock = FakeClock()
    progress = Progress(10, clock)
    clock.now += 4000
    progress.update(done=5, failed=0)
    assert (progress.done, progress.chunks) == (5, 0)
    assert progress.line().endswith("ETA 1:06:40")
    progress.update(done=9, failed=1, chunks=40)
    assert progress.eta_s == 0

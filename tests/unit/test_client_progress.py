"""Progress line: counts, rate and ETA on a fake clock; how a run shows on a terminal and elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from tests.clock import FakeClock
from tritonrag.clients.console import ConsoleReporter, result_line
from tritonrag.clients.extract import Extraction, FileError
from tritonrag.clients.http_client import ApiError
from tritonrag.clients.ingest import Failure
from tritonrag.clients.progress import Progress
from tritonrag.clients.wire.schema import DocumentIn


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


def reporter(terminal: bool, clock: FakeClock) -> tuple[ConsoleReporter, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=60, color_system=None)
    return ConsoleReporter(console, interval_s=10, clock=clock), out


def test_without_a_terminal_progress_is_a_plain_line_now_and_then_and_a_summary() -> None:
    clock = FakeClock()
    progress = Progress(3, clock)
    report, out = reporter(False, clock)
    skipped = FileError(Path("a/b.html"), "a/b.html: is not text (no character encoding fits its bytes)")
    extraction = Extraction([DocumentIn(id=f"d{i}", text="text") for i in range(5)], [skipped], files=5)
    report.read(extraction, 2)
    with report:
        report.progress(progress)
        clock.now += 4
        progress.advance(1, chunks=5)
        report.progress(progress)  # within the interval: not shown
        report.retrying(ApiError(503, "UNAVAILABLE", "no Triton endpoint can serve 'embedder' [now]"), 1, 1.5)
        clock.now += 6
        progress.advance(1, chunks=5)
        report.progress(progress)
        report.failed([Failure("d2", "422 INVALID_ARGUMENT: text is empty")])
        progress.advance(0, failed=1)
        report.progress(progress)  # all settled: shown
    report.summary([skipped])
    assert out.getvalue().splitlines() == [
        "read 5 files: 5 documents, 3 to ingest (2 already there); 1 skipped, listed at the end",
        "0/3 documents, 0 chunks, 0.0 chunks/s, ETA --:--:--",
        "retrying in 1.5 s (attempt 1): 503 UNAVAILABLE: no Triton endpoint can serve 'embedder' [now]",
        "2/3 documents, 10 chunks, 1.0 chunks/s, ETA 0:00:05",
        "3/3 documents (1 failed), 10 chunks, 1.0 chunks/s, ETA 0:00:00",
        "skipped 1 file:",
        "  a/b.html: is not text (no character encoding fits its bytes)",
        "failed 1 document:",
        "  d2: 422 INVALID_ARGUMENT: text is empty",
    ]
    assert result_line(progress, "docs", 4, 1, 12.4) == (
        "ingested 2 documents (10 chunks) into 'docs' in 0:00:12; 1 failed, 4 already there, 1 file skipped"
    )


def test_on_a_terminal_progress_is_a_live_bar() -> None:
    clock = FakeClock()
    progress = Progress(7, clock)
    report, out = reporter(True, clock)
    with report:
        report.progress(progress)
        clock.now += 2
        progress.advance(7, chunks=9)
        report.progress(progress)
    assert "━" in out.getvalue() and "7/7 documents, 9 chunks, 4.5 chunks/s" in out.getvalue()

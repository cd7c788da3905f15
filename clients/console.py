"""How ``tritonrag ingest`` shows a run on stderr: a live bar on a terminal, plain lines elsewhere, a summary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn
from rich.progress import Progress as Bar

from tritonrag.clients.extract import Extraction, FileError
from tritonrag.clients.ingest import Failure, describe
from tritonrag.clients.progress import Progress, duration


class ConsoleReporter:
    """Shows an ingestion: a live progress bar when ``console`` is a terminal, else its progress line at most
    every ``interval_s`` (and once all is settled); retries as they happen; failures in the summary."""

    def __init__(
        self, console: Console | None = None, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console or Console(stderr=True)
        self.failures: list[Failure] = []
        self._interval_s = interval_s
        self._clock = clock
        self._last_line_at = -math.inf
        self._bar: Bar | None = None
        self._task: TaskID | None = None
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            columns = (SpinnerColumn(), BarColumn(bar_width=20), TextColumn("{task.fields[line]}", markup=False))
            self._bar = Bar(*columns, console=self.console, refresh_per_second=4)

    def __enter__(self) -> ConsoleReporter:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def read(self, extraction: Extraction, already_there: int) -> None:
        """What the files held."""
        pending = len(extraction.documents) - already_there
        self._say(
            f"read {_count(extraction.files, 'file')}: {_count(len(extraction.documents), 'document')}, "
            f"{pending} to ingest ({already_there} already there)"
            + (f"; {len(extraction.errors)} skipped, listed at the end" if extraction.errors else "")
        )

    def progress(self, progress: Progress) -> None:
        settled = progress.done + progress.failed
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task("", total=progress.total, line="")
            self._bar.update(self._task, completed=settled, line=progress.line())
        elif settled >= progress.total or self._clock() - self._last_line_at >= self._interval_s:
            self._last_line_at = self._clock()
            self._say(progress.line())

    def failed(self, failures: Sequence[Failure]) -> None:
        self.failures.extend(failures)

    def retrying(self, error: Exception, attempt: int, delay_s: float) -> None:
        self._say(f"retrying in {delay_s:.1f} s (attempt {attempt}): {describe(error)}")

    def summary(self, skipped: Sequence[FileError]) -> None:
        """The files skipped and the documents failed, each with its reason."""
        if skipped:
            self._say(f"skipped {_count(len(skipped), 'file')}:")
            for error in skipped:
                self._say(f"  {error.error}")
        if self.failures:
            self._say(f"failed {_count(len(self.failures), 'document')}:")
            for failure in self.failures:
                self._say(f"  {failure.doc_id}: {failure.reason}")

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def result_line(progress: Progress, collection: str, already_there: int, skipped: int, wall_s: float) -> str:
    """E.g. ``ingested 7 documents (9 chunks) into 'docs' in 0:00:02; 0 failed, 0 already there, 1 file skipped``."""
    return (
        f"ingested {progress.done} documents ({progress.chunks} chunks) into {collection!r} in "
        f"{duration(wall_s)}; {progress.failed} failed, {already_there} already there, "
        f"{_count(skipped, 'file')} skipped"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"

"""``tritonrag ingest``: files → documents → the orchestrator, in batches, resumable.

Each batch that the API acknowledges is recorded in a state file (by document id and a hash
of its content), written atomically; a rerun of the same command skips what was recorded, so
an interrupted ingest resumes where it stopped.

One bad document or one slow call does not stop a run. A batch that fails with a transient error
(HTTP 408, 429, 502, 503, 504, a connection error, a timeout) is tried again after a jittered
exponential backoff (or the wait its ``Retry-After`` asks for), split in halves, as smaller requests
finish sooner; the batches after it start that small and grow back by one document per success. A
batch refused for what it holds (any other error but 401, 403, 404 and 405) is split until the
documents at fault are alone; they fail with their reason while the others land. An upsert run as a
job (202) is polled until the job ends, and the documents it lists as failed fail with its reasons.
The run stops only when the server stays unavailable through the retry budget
(``ServerUnavailableError``), or answers that no request can succeed (401, 403, 404, 405: ``ApiError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import httpx2

from tritonrag.clients.progress import Progress
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, JobInfo, JobStatus

from .http_client import ApiError, TritonRagClient

T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
# Answers that no request to this server and collection can change: the run stops.
FATAL_STATUSES = frozenset({401, 403, 404, 405})
_FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed})


def content_hash(document: DocumentIn) -> str:
    """A digest of what an upsert of ``document`` writes."""
    payload = json.dumps([document.text, document.metadata], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


class IngestState:
    """Documents already acknowledged for one collection, persisted in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def pending(self, documents: Sequence[DocumentIn]) -> list[DocumentIn]:
        """The documents not yet acknowledged with their current content."""
        return [d for d in documents if self.done.get(d.id) != content_hash(d)]

    def record(self, documents: Sequence[DocumentIn]) -> None:
        """Mark ``documents`` acknowledged; the file is replaced atomically."""
        self.done.update({d.id: content_hash(d) for d in documents})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as file:
            json.dump(self.done, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)


@dataclass(frozen=True)
class Failure:
    """A document that did not land, and why."""

    doc_id: str
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """How long a run keeps trying while the server answers with transient errors.

    The run gives up after ``max_attempts`` transient failures in a row, or when the next wait would
    end more than ``max_wait_s`` after the first of them; any other answer starts the count again.
    """

    max_attempts: int = 20
    max_wait_s: float = 300.0
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    job_poll_s: float = 0.5


class ServerUnavailableError(Exception):
    """The server stayed unavailable through the retry budget; what landed is recorded, a rerun resumes."""


class Reporter(Protocol):
    """What an ingestion tells its user while it runs."""

    def progress(self, progress: Progress) -> None:
        """The counts changed."""

    def failed(self, failures: Sequence[Failure]) -> None:
        """These documents did not land."""

    def retrying(self, error: Exception, attempt: int, delay_s: float) -> None:
        """A call failed transiently for the ``attempt``-th time in a row; the next try is in ``delay_s``."""


def describe(error: Exception) -> str:
    """An API error as its status, code and message; another error with its kind (``ConnectError: ...``)."""
    return str(error) if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"


def is_transient(error: Exception) -> bool:
    """Whether ``error`` may go away by itself: a connection error, a timeout, or a transient status."""
    if isinstance(error, ApiError):
        return error.status in TRANSIENT_STATUSES
    return isinstance(error, httpx2.TransportError)


class Backoff:
    """Retries of transient failures, with jittered exponential delays or the server's ``Retry-After``."""

    def __init__(
        self,
        policy: RetryPolicy,
        reporter: Reporter,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self._reporter = reporter
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._failures = 0
        self._first_failure_at = 0.0

    def wait(self, error: Exception) -> None:
        """Sleep before trying again after the transient ``error``; ``ServerUnavailableError`` when the budget
        is spent."""
        now = self._clock()
        if not self._failures:
            self._first_failure_at = now
        self._failures += 1
        delay = self._delay(error)
        waited = now - self._first_failure_at
        if self._failures >= self.policy.max_attempts or waited + delay > self.policy.max_wait_s:
            raise ServerUnavailableError(
                f"the server stayed unavailable ({self._failures} attempts over {waited:.0f} s); last error: "
                f"{describe(error)}"
            ) from error
        self._reporter.retrying(error, self._failures, delay)
        self._sleep(delay)

    def reset(self) -> None:
        """The server answered: the next transient failure starts a new count."""
        self._failures = 0

    def call(self, function: Callable[[], T]) -> T:
        """``function()``, tried again while it fails transiently."""
        while True:
            try:
                result = function()
            except Exception as exc:
                if not is_transient(exc):
                    self.reset()
                    raise
                self.wait(exc)
                continue
            self.reset()
            return result

    def _delay(self, error: Exception) -> float:
        if isinstance(error, ApiError) and error.retry_after_s is not None:
            return error.retry_after_s
        ceiling = min(self.policy.max_delay_s, self.policy.base_delay_s * 2.0 ** (self._failures - 1))
        return ceiling * (0.5 + self._rng() / 2)


@dataclass
class _Outcome:
    """What one upsert settled: the documents known to have landed (recorded), the counts, the failures."""

    landed: list[DocumentIn]
    done: int
    failed: int = 0
    chunks: int = 0
    failures: list[Failure] = field(default_factory=list)


class Ingestion:
    """One run: the pending ``documents`` of a collection upserted in batches of up to ``batch_documents``."""

    def __init__(
        self,
        client: TritonRagClient,
        collection: str,
        documents: Sequence[DocumentIn],
        state: IngestState,
        reporter: Reporter,
        batch_documents: int = 32,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._collection = collection
        self._state = state
        self._reporter = reporter
        self._batch_documents = batch_documents
        self._batch_size = batch_documents  # smaller after transient failures, growing back after successes
        self._sleep = sleep
        self._backoff = Backoff(policy or RetryPolicy(), reporter, sleep, clock, rng)
        self.pending = state.pending(documents)
        self.already_there = len(documents) - len(self.pending)
        self.progress = Progress(len(self.pending), clock)

    def ensure_collection(self, create: bool) -> None:
        """Check that the collection exists; create it when it does not and ``create``."""
        try:
            self._backoff.call(lambda: self._client.get_collection(self._collection))
        except ApiError as exc:
            if exc.status != 404 or not create:
                raise
            self._backoff.call(lambda: self._client.create_collection(CollectionCreate(name=self._collection)))

    def run(self) -> Progress:
        """Upsert every pending document; ``ServerUnavailableError`` or a fatal ``ApiError`` stops the run."""
        self._reporter.progress(self.progress)
        start = 0
        while start < len(self.pending):
            batch = self.pending[start : start + self._batch_size]
            start += len(batch)
            self._settle(batch)
        return self.progress

    def _settle(self, documents: list[DocumentIn]) -> None:
        """Upsert ``documents``, in halves when the whole batch fails, and record what landed."""
        outcome = self._attempt(documents)
        if outcome is None:
            middle = len(documents) // 2
            self._settle(documents[:middle])
            self._settle(documents[middle:])
            return
        self._batch_size = min(self._batch_documents, self._batch_size + 1)
        self._state.record(outcome.landed)
        self.progress.advance(outcome.done, chunks=outcome.chunks, failed=outcome.failed)
        if outcome.failures:
            self._reporter.failed(outcome.failures)
        self._reporter.progress(self.progress)

    def _attempt(self, documents: list[DocumentIn]) -> _Outcome | None:
        """The outcome of upserting ``documents`` (a lone document tried again while it fails transiently);
        None when a batch of several failed and is to be split."""
        while True:
            try:
                outcome = self._send(documents)
            except Exception as exc:
                if is_transient(exc):
                    self._backoff.wait(exc)
                    if len(documents) == 1:
                        continue
                    self._batch_size = max(1, min(self._batch_size, len(documents) // 2))
                    return None
                self._backoff.reset()
                if not isinstance(exc, ApiError) or exc.status in FATAL_STATUSES:
                    raise
                if len(documents) > 1:
                    return None
                return _Outcome([], 0, failed=1, failures=[Failure(documents[0].id, str(exc))])
            self._backoff.reset()
            return outcome

    def _send(self, documents: list[DocumentIn]) -> _Outcome:
        """One upsert; when the API runs it as a job, the job's outcome."""
        result = self._client.upsert(self._collection, documents)
        if result.job_id is None:
            return _Outcome(documents, len(documents), chunks=result.chunks)
        return _job_outcome(self._await_job(result.job_id), documents)

    def _await_job(self, job_id: str) -> JobInfo:
        """Poll the job until it ends, showing its progress; transient failures of a poll are retried."""
        done, failed = self.progress.done, self.progress.failed
        try:
            while (job := self._backoff.call(lambda: self._client.get_job(job_id))).status not in _FINISHED:
                self.progress.update(done + job.done, failed + job.failed)
                self._reporter.progress(self.progress)
                self._sleep(self._backoff.policy.job_poll_s)
        finally:  # the caller counts the job's outcome
            self.progress.update(done, failed)
        return job


def _job_outcome(job: JobInfo, documents: list[DocumentIn]) -> _Outcome:
    """The documents a finished job upserted and its failures; when it names only some of its failed
    documents, which of the others landed is unknown, and none is recorded (a rerun sends them again)."""
    failures = [Failure(error.doc_id, error.error) for error in job.errors]
    unnamed = job.failed - len(failures)
    if unnamed > 0:
        failures.append(Failure(f"job {job.id}", f"{unnamed} more documents failed (the job names the first ones)"))
        return _Outcome([], job.done, job.failed, failures=failures)
    failed_ids = {failure.doc_id for failure in failures}
    return _Outcome([d for d in documents if d.id not in failed_ids], job.done, job.failed, failures=failures)

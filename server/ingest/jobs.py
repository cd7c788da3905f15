"""``JobRunner``: large upserts as background jobs that survive a restart, run here or on Celery workers.

A job's documents are stored with its row, in the catalog, in the transaction that creates it (so they live
where the catalog does: beside the collections, or in the shared database that replicas and workers share);
the row's JSON payload holds the position up to which every document is settled. After each batch of
``batch_documents`` the runner records, in one catalog update, the new position with the progress counts and
errors, so a restarted runner resumes at the first unsettled batch. A batch whose upsert was acknowledged just
before a crash is upserted again on resume, which replaces the same documents: at least once, never lost, never
duplicated.

A runner claims a job before running it (`Catalog.claim_job`): a job is run by one runner at a time, and a
runner records progress (a heartbeat at least) more often than ``job_lease_s``, so that when its process dies
another runner takes the job over once the lease has passed. Over local files one process owns the data: its
runner takes every unfinished job at start. Without a broker, each orchestrator runs the jobs it accepts (and,
over a shared store, takes over those whose runner died); with ``ingest.broker_url``, the orchestrator only
dispatches jobs (``dispatch``: a Celery task) and `tritonrag worker` processes run them (``run_job``).

Up to ``pipeline_batches`` consecutive batches are in flight at once (chunking, embedding and the
store write of one overlap those of the next); progress is recorded in order, so the resume point
never passes a batch that has not landed.

A batch that fails with a transient error (Triton unavailable, a deadline) is retried with backoff;
while the embedder is not ready at all (``ready`` says so: Triton restarting) the job pauses without
spending its attempts, for up to ``max_pause_s``. When retrying does not help, or the collection is
gone, the job stops and its remaining documents count as failed. Any other failure is narrowed down
to the documents that cause it, which are recorded as failed while the others are upserted. A job
ends ``succeeded`` when at least one of its documents was upserted (its failures are listed), else
``failed``.

A re-index job (``submit_reindex``) moves a collection to another embedder version: its payload names the
target, and a worker of its own (re-index jobs run one at a time, in order, beside the upsert jobs, which they
never hold up) calls ``reindex(collection, target)`` step after step (each retried as a batch is)
until a step says it finished, recording each step's progress in chunks (``done`` of ``total``). The steps
keep their own state in the collection's store, so a restarted runner just calls them again. A re-index that
cannot go on (the collection deleted, retrying does not help) ends ``failed``, its chunks not re-embedded
counted as failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from tritonrag.clients.wire.schema import DocumentError, DocumentIn, JobInfo, JobStatus, ModelVersion
from tritonrag.server.config import IngestSettings
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TritonRagError,
    UnavailableError,
)
from tritonrag.server.routing.resilience import backoff_delay
from tritonrag.server.store.catalog import Catalog, JobRecord

log = logging.getLogger(__name__)

Upsert = Callable[[str, Sequence[DocumentIn]], Awaitable[int]]
"""``upsert(collection, documents) -> chunks written``; returns once the documents are stored."""
Ready = Callable[[], Awaitable[bool]]
"""Whether what the upserts need (the embedder) can serve now."""


@dataclass(frozen=True, slots=True)
class ReindexStep:
    """What one step of a re-index did: chunks re-embedded (``done``) of ``total``, and whether it finished."""

    done: int
    total: int
    finished: bool


Reindex = Callable[[str, ModelVersion], Awaitable[ReindexStep]]
"""``reindex(collection, target)``: one step of re-indexing ``collection`` to the embedder version ``target``."""
_T = TypeVar("_T")

FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed})
_TRANSIENT = (UnavailableError, DeadlineExceededError)


class _JobStoppedError(Exception):
    """The job cannot go on; every document not yet settled fails with this reason."""


@dataclass
class _JobState:
    """A job's settled state, as stored in its catalog row: the position of its first unsettled document."""

    position: int
    done: int
    failed: int
    errors: list[DocumentError] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"position": self.position}


def reindex_target(record: JobRecord) -> ModelVersion | None:
    """The embedder version a re-index job moves its collection to; None for an upsert job."""
    payload = record.payload
    if isinstance(payload, dict) and payload.get("kind") == "reindex":
        return ModelVersion.model_validate(payload["embedder"])
    return None


Dispatch = Callable[[str], Awaitable[None]]
"""``dispatch(job_id)``: hand a job to the runners elsewhere (a Celery task)."""


class JobRunner:
    """Runs upsert jobs in the background, ``concurrent_jobs`` at a time, and re-index jobs one at a time beside
    them, recording them in the catalog; or, given ``dispatch``, hands them to runners elsewhere (Celery workers,
    which call `run_job`)."""

    def __init__(
        self,
        catalog: Catalog,
        upsert: Upsert,
        settings: IngestSettings | None = None,
        ready: Ready | None = None,
        *,
        reindex: Reindex | None = None,
        dispatch: Dispatch | None = None,
        legacy_jobs_dir: Path | None = None,
    ) -> None:
        """``legacy_jobs_dir``: where versions before 0.4 kept the documents of jobs (moved into the catalog at
        `start`)."""
        self._catalog = catalog
        self._upsert = upsert
        self._reindex = reindex
        self._dispatch = dispatch
        self._legacy_jobs_dir = legacy_jobs_dir
        self.settings = settings or IngestSettings()
        self._ready = ready
        self._owner = uuid.uuid4().hex  # this runner, in the jobs it claims
        # Over local files this process owns every job; over a shared store a job's runner may live elsewhere.
        self._lease_s = self.settings.job_lease_s if catalog.location.shared else 0.0
        self._queue: asyncio.Queue[str] = asyncio.Queue()  # upsert jobs
        self._reindex_queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()  # queued or running here
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Take over the jobs of earlier versions' files; then hand the unfinished jobs on (``dispatch``), or start the
        workers on them (oldest first) and, over a shared store, a sweep that takes over the jobs of runners that
        died."""
        if self._workers:
            return
        if self._legacy_jobs_dir is not None:
            await asyncio.to_thread(self._adopt_legacy_files, self._legacy_jobs_dir)
        if self._dispatch is not None:
            for record in await asyncio.to_thread(self._unfinished):
                await self._dispatch(record.info.id)
            return
        self._workers = [
            *(
                asyncio.create_task(self._work(self._queue), name=f"ingest-job-worker-{n}")
                for n in range(self.settings.concurrent_jobs)
            ),
            asyncio.create_task(self._work(self._reindex_queue), name="reindex-job-worker"),
            asyncio.create_task(self._sweep(), name="job-sweep"),
        ]

    async def close(self) -> None:
        """Stop the workers; a job they were running stays ``running`` and resumes at the next start (or, over a
        shared store, on another runner once its lease has passed)."""
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []

    async def _sweep(self) -> None:
        """Queue every unfinished job that is not running here: at start all of them, then, over a shared store, again
        every half lease (a claim decides which are free: queued ones, and those whose runner died)."""
        while True:
            for record in await asyncio.to_thread(self._unfinished):
                self._enqueue(record.info.id, self._reindex_queue if reindex_target(record) else self._queue)
            if self._lease_s <= 0:
                return
            await asyncio.sleep(self._lease_s / 2)

    async def submit(self, collection: str, documents: Sequence[DocumentIn]) -> str:
        """Persist ``documents`` as a new queued job and return its id.

        ``ResourceExhaustedError`` when the documents not yet settled in unfinished jobs would go over
        ``max_pending_documents``: nothing is written, and the client may retry later.
        """
        if not documents:
            raise InvalidArgumentError("a job needs at least one document", field="documents")
        upserts = [r.info for r in await asyncio.to_thread(self._unfinished) if reindex_target(r) is None]
        pending = sum(info.total - info.done - info.failed for info in upserts)
        limit = self.settings.max_pending_documents
        if pending + len(documents) > limit:
            raise ResourceExhaustedError(
                f"{pending} documents are waiting to be ingested and this upsert adds {len(documents)}: over the "
                f"limit of {limit} (ingest.max_pending_documents); retry when the running jobs have progressed",
                field="documents",
            )
        record = await asyncio.to_thread(
            self._catalog.create_job, collection, len(documents), {"position": 0}, documents
        )
        await self._hand_on(record.info.id, self._queue)
        return record.info.id

    async def submit_reindex(self, collection: str, embedder: ModelVersion) -> JobInfo:
        """A new queued job that re-indexes ``collection`` to ``embedder``, or the unfinished one that already
        does."""
        for info, target in await self.reindexes(collection):
            if target == embedder:
                return info
        payload = {"kind": "reindex", "embedder": embedder.model_dump()}
        record = await asyncio.to_thread(self._catalog.create_job, collection, 0, payload)
        await self._hand_on(record.info.id, self._reindex_queue)
        return record.info

    async def reindexes(self, collection: str | None = None) -> list[tuple[JobInfo, ModelVersion]]:
        """The unfinished re-index jobs (of ``collection`` when given), oldest first, with their targets."""
        records = await asyncio.to_thread(self._unfinished)
        targets = [(record.info, reindex_target(record)) for record in records]
        return [
            (info, target) for info, target in targets if target is not None and collection in (None, info.collection)
        ]

    async def get(self, job_id: str) -> JobInfo:
        """The job's state; ``NotFoundError`` when there is none."""
        return (await asyncio.to_thread(self._catalog.get_job, job_id)).info

    async def list_jobs(self, collection: str | None = None) -> list[JobInfo]:
        """Every job, oldest first (only those of ``collection`` when given)."""
        records = await asyncio.to_thread(self._catalog.list_jobs, None, collection)
        return [record.info for record in records]

    async def finished(self, job_id: str) -> bool:
        """Whether the job has ended (or is gone)."""
        try:
            return (await self.get(job_id)).status in FINISHED
        except NotFoundError:
            return True

    async def wait(self, job_id: str, poll_s: float = 0.05) -> JobInfo:
        """The job's state once it has finished."""
        while True:
            info = await self.get(job_id)
            if info.status in FINISHED:
                return info
            await asyncio.sleep(poll_s)

    async def _hand_on(self, job_id: str, queue: asyncio.Queue[str]) -> None:
        """Dispatch a new job, or queue it here."""
        if self._dispatch is not None:
            await self._dispatch(job_id)
        else:
            self._enqueue(job_id, queue)

    def _enqueue(self, job_id: str, queue: asyncio.Queue[str]) -> None:
        if job_id not in self._queued:
            self._queued.add(job_id)
            queue.put_nowait(job_id)

    def _unfinished(self) -> list[JobRecord]:
        # One read: with two, a job claimed between them (queued, then running) would be missed by both.
        return self._catalog.list_jobs((JobStatus.running, JobStatus.queued))

    async def _work(self, queue: asyncio.Queue[str]) -> None:
        while True:
            job_id = await queue.get()
            try:
                await self.run_job(job_id)
            except Exception:  # a broken job must not take the worker down
                log.exception("job %s failed unexpectedly", job_id)
            finally:
                self._queued.discard(job_id)
                queue.task_done()

    async def run_job(self, job_id: str) -> bool:
        """Claim the job and run it to its end; False, doing nothing, when it is finished, gone, or another runner's
        (alive: it recorded progress within the lease)."""
        record = await asyncio.to_thread(self._catalog.claim_job, job_id, self._owner, self._lease_s)
        if record is None:
            return False
        heartbeat = asyncio.create_task(self._heartbeat(job_id), name=f"job-heartbeat-{job_id}")
        try:
            await self._run(record)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        return True

    async def _heartbeat(self, job_id: str) -> None:
        """Record that the job's runner is alive, every third of the lease, while it runs (a batch may take longer)."""
        interval = (self._lease_s or self.settings.job_lease_s) / 3
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self._catalog.update_job, job_id)

    async def _run(self, record: JobRecord) -> None:
        info = record.info
        job_id = info.id
        target = reindex_target(record)
        if target is not None:
            await self._run_reindex(info, target)
            return
        payload = record.payload if isinstance(record.payload, dict) else {}
        state = _JobState(int(payload.get("position", 0)), info.done, info.failed, list(info.errors))
        try:
            await self._run_batches(job_id, info.collection, state)
        except _JobStoppedError as stopped:
            log.warning("job %s stopped: %s", job_id, stopped)
            remaining = await asyncio.to_thread(self._catalog.job_document_ids, job_id, state.position)
            self._report(state, [DocumentError(doc_id=doc_id, error=str(stopped)) for doc_id in remaining])
            state.failed = info.total - state.done
            await asyncio.to_thread(self._finish, job_id, state, JobStatus.failed)
        else:
            status = JobStatus.succeeded if state.done else JobStatus.failed
            await asyncio.to_thread(self._finish, job_id, state, status)
        log.info("job %s finished: %d done, %d failed", job_id, state.done, state.failed)

    async def _run_reindex(self, info: JobInfo, target: ModelVersion) -> None:
        """Call the re-index's steps until one finishes, recording each one's progress."""
        job_id, done, total = info.id, info.done, info.total
        try:
            if self._reindex is None:
                raise _JobStoppedError("this runner does not run re-index jobs")
            step = partial(self._reindex, info.collection, target)
            while True:
                progress = await self._retrying(info.collection, step)
                done, total = progress.done, progress.total
                finished = progress.finished
                status = JobStatus.succeeded if finished else None
                await asyncio.to_thread(self._catalog.update_job, job_id, status=status, total=total, done=done)
                if finished:
                    break
        except Exception as exc:  # whatever stops it, the job ends failed, saying why
            reason = str(exc) if isinstance(exc, _JobStoppedError) else _message(exc)
            log.warning("re-index job %s stopped: %s", job_id, reason)
            error = DocumentError(doc_id="", error=reason)
            await asyncio.to_thread(
                self._catalog.update_job, job_id, status=JobStatus.failed, failed=total - done, errors=[error]
            )
            return
        log.info("re-index job %s finished: %r is pinned to version %s", job_id, info.collection, target.version)

    async def _run_batches(self, job_id: str, collection: str, state: _JobState) -> None:
        """Settle the job's batches from ``state.position`` on, up to ``pipeline_batches`` at once, recording
        each one's outcome in order."""
        in_flight: collections.deque[tuple[asyncio.Task[tuple[int, list[DocumentError]]], int]] = collections.deque()
        read_position = state.position
        try:
            while True:
                while len(in_flight) < self.settings.pipeline_batches:
                    batch = await asyncio.to_thread(
                        self._catalog.job_documents, job_id, read_position, self.settings.batch_documents
                    )
                    if not batch:
                        break
                    read_position += len(batch)
                    in_flight.append((asyncio.create_task(self._settle(collection, batch)), read_position))
                if not in_flight:
                    return
                settling, next_position = in_flight.popleft()
                done, errors = await settling
                state.position = next_position
                state.done += done
                state.failed += len(errors)
                self._report(state, errors)
                await asyncio.to_thread(self._save, job_id, state, None)
        finally:
            for settling, _ in in_flight:
                settling.cancel()
            await asyncio.gather(*(settling for settling, _ in in_flight), return_exceptions=True)

    def _report(self, state: _JobState, errors: Sequence[DocumentError]) -> None:
        """Keep the first ``max_reported_errors`` errors of a job."""
        room = max(0, self.settings.max_reported_errors - len(state.errors))
        state.errors.extend(errors[:room])

    def _save(self, job_id: str, state: _JobState, status: JobStatus | None) -> None:
        self._catalog.update_job(
            job_id,
            status=status,
            done=state.done,
            failed=state.failed,
            errors=state.errors,
            payload=state.payload(),
        )

    def _finish(self, job_id: str, state: _JobState, status: JobStatus) -> None:
        fields = {"done": state.done, "failed": state.failed, "errors": state.errors, "payload": state.payload()}
        self._catalog.finish_job(job_id, status, **fields)

    def _adopt_legacy_files(self, directory: Path) -> None:
        """Move the unsettled documents of jobs from before 0.4 (``<directory>/<file>.jsonl`` from a byte offset)
        into the catalog, and delete the files."""
        for record in self._unfinished():
            payload = record.payload
            if not (isinstance(payload, dict) and "file" in payload):
                continue
            path, info = directory / str(payload["file"]), record.info
            if path.is_file():
                documents = _read_legacy_file(path, int(payload.get("offset", 0)))
                self._catalog.attach_job_documents(info.id, documents, {"position": 0})
            else:
                error = DocumentError(doc_id="", error=f"the job's documents are gone ({path} is missing)")
                failed = info.total - info.done
                self._catalog.finish_job(info.id, JobStatus.failed, failed=failed, errors=[*info.errors, error])
        if directory.is_dir():
            for path in directory.glob("*.jsonl"):
                path.unlink()

    async def _settle(self, collection: str, batch: Sequence[DocumentIn]) -> tuple[int, list[DocumentError]]:
        """Upsert ``batch``; on a failure that is not transient, split it to find the failing documents.

        Returns how many documents were upserted and the errors of the others.
        """
        try:
            await self._retrying(collection, partial(self._upsert, collection, batch))
            return len(batch), []
        except _JobStoppedError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                if not isinstance(exc, TritonRagError):
                    log.exception("upserting document %r failed", batch[0].id)
                return 0, [DocumentError(doc_id=batch[0].id, error=_message(exc))]
        middle = len(batch) // 2
        first_done, first_errors = await self._settle(collection, batch[:middle])
        second_done, second_errors = await self._settle(collection, batch[middle:])
        return first_done + second_done, first_errors + second_errors

    async def _retrying(self, collection: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()`` (one batch or step of work on ``collection``), retried with backoff while the failure is
        transient (pausing while the embedder is not ready at all); raises ``_JobStoppedError`` when retrying
        does not help or the collection is gone."""
        attempt = 0
        while True:
            try:
                return await call()
            except NotFoundError as exc:
                raise _JobStoppedError(exc.message) from exc
            except _TRANSIENT as exc:
                if await self._paused_until_ready(collection, exc.message):
                    continue
                attempt += 1
                if attempt == self.settings.max_attempts:
                    raise _JobStoppedError(f"{exc.message} (after {attempt} attempts)") from exc
                delay = backoff_delay(attempt - 1, self.settings.backoff_base_s, self.settings.backoff_max_s)
                log.info("work on %r failed (%s); retrying in %.1fs", collection, exc.message, delay)
                await asyncio.sleep(delay)

    async def _paused_until_ready(self, collection: str, reason: str) -> bool:
        """While the embedder is not ready, wait for it (up to ``max_pause_s``); whether the job paused."""
        if self._ready is None or await self._ready():
            return False
        log.warning("ingestion into %r paused: %s; waiting for the embedder", collection, reason)
        try:
            async with asyncio.timeout(self.settings.max_pause_s):
                while not await self._ready():
                    await asyncio.sleep(self.settings.backoff_base_s)
        except TimeoutError:
            raise _JobStoppedError(f"{reason} (not ready for {self.settings.max_pause_s:g} s)") from None
        log.info("ingestion into %r resumes", collection)
        return True


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, TritonRagError) else f"{type(exc).__name__}: {exc}"


def _read_legacy_file(path: Path, offset: int) -> list[DocumentIn]:
    """The documents of a job file of a version before 0.4, one JSON document per line, from byte ``offset`` on."""
    with path.open("rb") as source:
        source.seek(offset)
        return [DocumentIn.model_validate_json(line) for line in source if line.strip()]

"""``JobRunner``: large upserts as background jobs that survive a restart.

A job's documents are written to a payload file (``<jobs_dir>/<name>.jsonl``, one document per line)
before its row is created in the catalog; the row's JSON payload names the file and the byte offset
up to which every document is settled. After each batch of ``batch_documents`` the runner records,
in one catalog update, the new offset with the progress counts and errors, so a restarted runner
resumes at the first unsettled batch. A batch whose upsert was acknowledged just before a crash is
upserted again on resume, which replaces the same documents: at least once, never lost.

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
import json
import logging
import os
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
    """A job's settled state, as stored in its catalog row."""

    file: str
    offset: int
    done: int
    failed: int
    errors: list[DocumentError] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset}


def reindex_target(record: JobRecord) -> ModelVersion | None:
    """The embedder version a re-index job moves its collection to; None for an upsert job."""
    payload = record.payload
    if isinstance(payload, dict) and payload.get("kind") == "reindex":
        return ModelVersion.model_validate(payload["embedder"])
    return None


class JobRunner:
    """Runs upsert jobs in the background, ``concurrent_jobs`` at a time, and re-index jobs one at a time beside
    them, recording them in the catalog."""

    def __init__(
        self,
        catalog: Catalog,
        upsert: Upsert,
        jobs_dir: Path,
        settings: IngestSettings | None = None,
        ready: Ready | None = None,
        *,
        reindex: Reindex | None = None,
    ) -> None:
        self._catalog = catalog
        self._upsert = upsert
        self._reindex = reindex
        self._jobs_dir = jobs_dir
        self.settings = settings or IngestSettings()
        self._ready = ready
        self._queue: asyncio.Queue[str] = asyncio.Queue()  # upsert jobs
        self._reindex_queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()  # queued or running here
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Requeue unfinished jobs (oldest first), drop orphaned payload files, and start the workers."""
        if self._workers:
            return
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        unfinished = await asyncio.to_thread(self._unfinished)
        keep = {str(record.payload.get("file")) for record in unfinished if isinstance(record.payload, dict)}
        for path in self._jobs_dir.glob("*.jsonl"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        for record in unfinished:
            info = record.info
            log.info("resuming job %s (%d of %d settled)", info.id, info.done + info.failed, info.total)
            self._enqueue(info.id, self._reindex_queue if reindex_target(record) else self._queue)
        self._workers = [
            *(
                asyncio.create_task(self._work(self._queue), name=f"ingest-job-worker-{n}")
                for n in range(self.settings.concurrent_jobs)
            ),
            asyncio.create_task(self._work(self._reindex_queue), name="reindex-job-worker"),
        ]

    async def close(self) -> None:
        """Stop the workers; a job they were running stays ``running`` and resumes at the next start."""
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []

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
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.jsonl"
        await asyncio.to_thread(_write_payload, self._jobs_dir / name, documents)
        record = await asyncio.to_thread(
            self._catalog.create_job, collection, len(documents), {"file": name, "offset": 0}
        )
        self._enqueue(record.info.id, self._queue)
        return record.info.id

    async def submit_reindex(self, collection: str, embedder: ModelVersion) -> JobInfo:
        """A new queued job that re-indexes ``collection`` to ``embedder``, or the unfinished one that already
        does."""
        for info, target in await self.reindexes(collection):
            if target == embedder:
                return info
        payload = {"kind": "reindex", "embedder": embedder.model_dump()}
        record = await asyncio.to_thread(self._catalog.create_job, collection, 0, payload)
        self._enqueue(record.info.id, self._reindex_queue)
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

    async def wait(self, job_id: str, poll_s: float = 0.05) -> JobInfo:
        """The job's state once it has finished."""
        while True:
            info = await self.get(job_id)
            if info.status in FINISHED:
                return info
            await asyncio.sleep(poll_s)

    def _enqueue(self, job_id: str, queue: asyncio.Queue[str]) -> None:
        if job_id not in self._queued:
            self._queued.add(job_id)
            queue.put_nowait(job_id)

    def _unfinished(self) -> list[JobRecord]:
        records = self._catalog.list_jobs(JobStatus.running) + self._catalog.list_jobs(JobStatus.queued)
        return sorted(records, key=lambda r: (r.info.created_at, r.info.id))

    async def _work(self, queue: asyncio.Queue[str]) -> None:
        while True:
            job_id = await queue.get()
            try:
                await self._run(job_id)
            except Exception:  # a broken job must not take the worker down
                log.exception("job %s failed unexpectedly", job_id)
            finally:
                self._queued.discard(job_id)
                queue.task_done()

    async def _run(self, job_id: str) -> None:
        record = await asyncio.to_thread(self._catalog.get_job, job_id)
        info = record.info
        if info.status in FINISHED:
            return
        target = reindex_target(record)
        if target is not None:
            await self._run_reindex(info, target)
            return
        payload = record.payload if isinstance(record.payload, dict) else {}
        state = _JobState(
            str(payload.get("file")), int(payload.get("offset", 0)), info.done, info.failed, list(info.errors)
        )
        path = self._jobs_dir / state.file
        await asyncio.to_thread(self._catalog.update_job, job_id, status=JobStatus.running)
        try:
            if not path.is_file():
                raise _JobStoppedError(f"the job's documents are gone ({path} is missing)")
            await self._run_batches(job_id, info.collection, path, state)
        except _JobStoppedError as stopped:
            log.warning("job %s stopped: %s", job_id, stopped)
            remaining = await asyncio.to_thread(_read_ids, path, state.offset) if path.is_file() else []
            self._report(state, [DocumentError(doc_id=doc_id, error=str(stopped)) for doc_id in remaining])
            state.failed = info.total - state.done
            await asyncio.to_thread(self._save, job_id, state, JobStatus.failed)
        else:
            status = JobStatus.succeeded if state.done else JobStatus.failed
            await asyncio.to_thread(self._save, job_id, state, status)
        path.unlink(missing_ok=True)
        log.info("job %s finished: %d done, %d failed", job_id, state.done, state.failed)

    async def _run_reindex(self, info: JobInfo, target: ModelVersion) -> None:
        """Call the re-index's steps until one finishes, recording each one's progress."""
        job_id, done, total = info.id, info.done, info.total
        await asyncio.to_thread(self._catalog.update_job, job_id, status=JobStatus.running)
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

    async def _run_batches(self, job_id: str, collection: str, path: Path, state: _JobState) -> None:
        """Settle the job's batches from ``state.offset`` on, up to ``pipeline_batches`` at once, recording
        each one's outcome in order."""
        in_flight: collections.deque[tuple[asyncio.Task[tuple[int, list[DocumentError]]], int]] = collections.deque()
        read_offset = state.offset
        try:
            while True:
                while len(in_flight) < self.settings.pipeline_batches:
                    batch, read_offset_after = await asyncio.to_thread(
                        _read_batch, path, read_offset, self.settings.batch_documents
                    )
                    if not batch:
                        break
                    in_flight.append((asyncio.create_task(self._settle(collection, batch)), read_offset_after))
                    read_offset = read_offset_after
                if not in_flight:
                    return
                settling, next_offset = in_flight.popleft()
                done, errors = await settling
                state.offset = next_offset
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


def _write_payload(path: Path, documents: Sequence[DocumentIn]) -> None:
    """One JSON document per line, flushed to disk before the job that names it is created."""
    with path.open("w", encoding="utf-8") as out:
        for document in documents:
            out.write(document.model_dump_json())
            out.write("\n")
        out.flush()
        os.fsync(out.fileno())


def _read_batch(path: Path, offset: int, size: int) -> tuple[list[DocumentIn], int]:
    """Up to ``size`` documents from byte ``offset``, and the offset after them."""
    with path.open("rb") as source:
        source.seek(offset)
        documents = []
        for _ in range(size):
            line = source.readline()
            if not line:
                break
            documents.append(DocumentIn.model_validate_json(line))
        return documents, source.tell()


def _read_ids(path: Path, offset: int) -> list[str]:
    """The ids of the documents from byte ``offset`` on."""
    with path.open("rb") as source:
        source.seek(offset)
        return [str(json.loads(line)["id"]) for line in source if line.strip()]

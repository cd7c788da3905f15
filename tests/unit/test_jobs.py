"""JobRunner with a fake upsert on a real catalog: progress, per-document errors, resume after a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tritonrag.clients.wire.schema import DocumentIn, JobStatus
from tritonrag.server.config import IngestSettings
from tritonrag.server.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from tritonrag.server.ingest.jobs import JobRunner
from tritonrag.server.store.catalog import Catalog

T = TypeVar("T")

# One batch at a time, so that the order of calls is the order of batches; pipelining has tests of its own.
SETTINGS = IngestSettings(
    batch_documents=3, backoff_base_s=0.001, backoff_max_s=0.002, max_attempts=3, pipeline_batches=1
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def docs(n: int, bad: Sequence[int] = ()) -> list[DocumentIn]:
    return [DocumentIn(id=f"d{i}", text=f"{'bad' if i in bad else 'good'} document {i}") for i in range(n)]


class FakeUpsert:
    """Records each call; fails documents whose text starts with "bad"; scripted errors first."""

    def __init__(
        self, script: Sequence[BaseException] = (), gate_after: int | None = None, outage_after: int | None = None
    ) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.script = list(script)
        self.gate_after = gate_after  # calls answered before the rest block forever
        self.outage_after = outage_after  # calls answered before the rest find Triton unavailable
        self.blocked = asyncio.Event()

    async def __call__(self, collection: str, documents: Sequence[DocumentIn]) -> int:
        if self.gate_after is not None and len(self.calls) >= self.gate_after:
            self.blocked.set()
            await asyncio.Event().wait()
        self.calls.append((collection, [d.id for d in documents]))
        if self.script:
            raise self.script.pop(0)
        if self.outage_after is not None and len(self.calls) > self.outage_after:
            raise UnavailableError("triton down")
        bad = [d.id for d in documents if d.text.startswith("bad")]
        if bad:
            raise InvalidArgumentError(f"cannot embed {bad[0]}")
        return 2 * len(documents)

    def upserted(self) -> list[str]:
        return [doc_id for _, ids in self.calls for doc_id in ids]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.sqlite")


def test_job_runs_in_batches_and_reports_progress(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert()

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        job_id = await runner.submit("col", docs(10))
        info = await runner.wait(job_id)
        assert catalog.job_documents(job_id, 0, 100) == []  # the documents go once the job is finished
        assert info.status is JobStatus.succeeded
        assert (info.total, info.done, info.failed, info.errors) == (10, 10, 0, [])
        assert info.collection == "col" and info.updated_at >= info.created_at
        assert [j.id for j in await runner.list_jobs("col")] == [job_id]
        assert await runner.list_jobs("other") == []
        await runner.close()

    run(scenario())
    assert [len(ids) for _, ids in upsert.calls] == [3, 3, 3, 1]
    assert upsert.upserted() == [f"d{i}" for i in range(10)]


def test_progress_is_visible_while_the_job_runs(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert(gate_after=2)

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        job_id = await runner.submit("col", docs(10))
        await upsert.blocked.wait()  # two batches are recorded before the third call
        info = await runner.get(job_id)
        assert (info.status, info.done, info.failed) == (JobStatus.running, 6, 0)
        await runner.close()

    run(scenario())


def test_failing_documents_are_isolated_and_reported(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert()

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(8, bad=[1, 6])))
        await runner.close()
        assert info.status is JobStatus.succeeded
        assert (info.done, info.failed) == (6, 2)
        assert [(e.doc_id, e.error) for e in info.errors] == [("d1", "cannot embed d1"), ("d6", "cannot embed d6")]

    run(scenario())
    good = [f"d{i}" for i in range(8) if i not in (1, 6)]
    assert sorted(set(upsert.upserted()) - {"d1", "d6"}) == good


def test_unexpected_exceptions_fail_only_their_document(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert(script=[RuntimeError("disk on fire")] * 3)

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS.model_copy(update={"batch_documents": 2}))
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(4)))
        await runner.close()
        # The batch [d0, d1] fails, then d0 alone fails, then d1 alone fails; the rest go through.
        assert (info.done, info.failed) == (2, 2)
        assert [(e.doc_id, e.error) for e in info.errors] == [
            ("d0", "RuntimeError: disk on fire"),
            ("d1", "RuntimeError: disk on fire"),
        ]

    run(scenario())


def test_reported_errors_are_capped_but_counted(catalog: Catalog, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"max_reported_errors": 3})

    async def scenario() -> None:
        runner = JobRunner(catalog, FakeUpsert(), settings)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(12, bad=range(1, 12))))
        await runner.close()
        assert info.status is JobStatus.succeeded
        assert (info.done, info.failed, len(info.errors)) == (1, 11, 3)

    run(scenario())


def test_a_job_where_every_document_fails_has_failed(catalog: Catalog, tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = JobRunner(catalog, FakeUpsert(), SETTINGS)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(2, bad=[0, 1])))
        await runner.close()
        assert (info.status, info.done, info.failed) == (JobStatus.failed, 0, 2)

    run(scenario())


def test_transient_errors_are_retried(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert(script=[UnavailableError("triton down")] * 2)

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(3)))
        await runner.close()
        assert (info.status, info.done, info.failed) == (JobStatus.succeeded, 3, 0)

    run(scenario())
    assert len(upsert.calls) == 3


def test_persistent_unavailability_stops_the_job(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert(outage_after=1)

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(7)))
        await runner.close()
        assert info.status is JobStatus.failed
        assert (info.done, info.failed) == (3, 4)
        assert [e.doc_id for e in info.errors] == ["d3", "d4", "d5", "d6"]
        assert info.errors[0].error == "triton down (after 3 attempts)"

    run(scenario())


def test_a_deleted_collection_stops_the_job_without_retries(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert(script=[NotFoundError("collection 'col' does not exist")])

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(5)))
        await runner.close()
        assert (info.status, info.done, info.failed) == (JobStatus.failed, 0, 5)
        assert {e.error for e in info.errors} == {"collection 'col' does not exist"}

    run(scenario())
    assert len(upsert.calls) == 1


def test_jobs_resume_after_a_crash_where_they_stopped(tmp_path: Path) -> None:
    first = FakeUpsert(gate_after=2)  # acknowledges two batches, then hangs until the "crash"
    second = FakeUpsert()

    async def before_crash() -> tuple[str, str]:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        runner = JobRunner(catalog, first, SETTINGS)
        await runner.start()
        running = await runner.submit("col", docs(10, bad=[7]))
        queued = await runner.submit("other", docs(2))
        await first.blocked.wait()
        await runner.close()  # nothing is written after a cancellation, as after a kill
        catalog.close()
        return running, queued

    async def after_restart(running: str, queued: str) -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        assert catalog.get_job(running).info.status is JobStatus.running
        assert catalog.get_job(queued).info.status is JobStatus.queued
        runner = JobRunner(catalog, second, SETTINGS)
        await runner.start()
        resumed, later = await runner.wait(running), await runner.wait(queued)
        await runner.close()
        assert (resumed.status, resumed.total, resumed.done, resumed.failed) == (JobStatus.succeeded, 10, 9, 1)
        assert [e.doc_id for e in resumed.errors] == ["d7"]
        assert (later.status, later.done) == (JobStatus.succeeded, 2)

    running, queued = run(before_crash())
    assert first.upserted() == [f"d{i}" for i in range(6)]
    run(after_restart(running, queued))
    # The restarted runner starts at the first unsettled batch: nothing acknowledged is sent again.
    # (The third batch fails as a whole, then in halves, to find d7.)
    assert [ids for col, ids in second.calls if col == "col"] == [
        ["d6", "d7", "d8"],
        ["d6"],
        ["d7", "d8"],
        ["d7"],
        ["d8"],
        ["d9"],
    ]


def test_jobs_of_earlier_versions_files_move_into_the_catalog_and_lost_files_fail_their_job(
    catalog: Catalog, tmp_path: Path
) -> None:
    """Before 0.4 a job's documents were a file of JSON lines and its payload a byte offset into it."""
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    lines = [DocumentIn(id=f"d{i}", text=f"text {i}").model_dump_json() for i in range(5)]
    (jobs_dir / "old.jsonl").write_text("".join(f"{line}\n" for line in lines))
    (jobs_dir / "orphan.jsonl").write_text('{"id": "x", "text": "y"}\n')  # written, but no job row
    offset = len(lines[0]) + len(lines[1]) + 2  # two documents were settled
    old = catalog.create_job("col", 5, {"file": "old.jsonl", "offset": offset}).info.id
    catalog.update_job(old, status=JobStatus.running, done=2)
    lost = catalog.create_job("col", 4, {"file": "gone.jsonl", "offset": 0}).info.id
    upsert = FakeUpsert()

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS, legacy_jobs_dir=jobs_dir)
        await runner.start()
        resumed, failed = await runner.wait(old), await runner.wait(lost)
        await runner.close()
        assert (resumed.status, resumed.done, resumed.failed) == (JobStatus.succeeded, 5, 0)
        assert (failed.status, failed.done, failed.failed) == (JobStatus.failed, 0, 4)
        assert "gone.jsonl is missing" in failed.errors[0].error

    run(scenario())
    assert upsert.upserted() == ["d2", "d3", "d4"]
    assert list(jobs_dir.iterdir()) == []


def test_a_job_is_run_by_one_runner_at_a_time_and_taken_over_once_its_runner_stops_recording_progress(
    catalog: Catalog,
) -> None:
    job = catalog.create_job("col", 2, {"position": 0}, docs(2)).info.id
    assert catalog.claim_job(job, "first", lease_s=60) is not None
    assert catalog.claim_job(job, "second", lease_s=60) is None  # the first recorded progress just now
    assert catalog.claim_job(job, "first", lease_s=60) is not None  # its own job again, after a restart
    time.sleep(0.05)
    claimed = catalog.claim_job(job, "second", lease_s=0.01)  # the first is silent for longer than the lease
    assert claimed is not None and claimed.info.status is JobStatus.running
    assert catalog.claim_job(job, "first", lease_s=60) is None
    catalog.finish_job(job, JobStatus.succeeded, done=2)
    assert catalog.claim_job(job, "second", lease_s=0) is None  # finished
    assert catalog.job_documents(job, 0, 10) == []


def test_with_a_dispatcher_jobs_are_handed_on_not_run(catalog: Catalog) -> None:
    dispatched: list[str] = []
    upsert = FakeUpsert()

    async def dispatch(job_id: str) -> None:
        dispatched.append(job_id)

    async def scenario() -> None:
        earlier = catalog.create_job("col", 1, {"position": 0}, docs(1)).info.id
        runner = JobRunner(catalog, upsert, SETTINGS, dispatch=dispatch)
        await runner.start()  # the unfinished jobs are handed on again
        job_id = await runner.submit("col", docs(3))
        assert dispatched == [earlier, job_id]
        assert (await runner.get(job_id)).status is JobStatus.queued
        other = JobRunner(catalog, upsert, SETTINGS)  # a worker's runner
        assert await other.run_job(job_id) and not await other.run_job(job_id)
        assert (await other.get(job_id)).status is JobStatus.succeeded
        await runner.close()

    run(scenario())
    assert upsert.upserted() == ["d0", "d1", "d2"]


def test_jobs_run_one_at_a_time_in_order(catalog: Catalog, tmp_path: Path) -> None:
    upsert = FakeUpsert()

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS)
        ids = [await runner.submit(name, docs(4)) for name in ("a", "b", "c")]  # queued before the start
        await runner.start()
        for job_id in ids:
            assert (await runner.wait(job_id)).status is JobStatus.succeeded
        await runner.close()

    run(scenario())
    assert [collection for collection, _ in upsert.calls] == ["a", "a", "b", "b", "c", "c"]


def test_bad_requests(catalog: Catalog, tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = JobRunner(catalog, FakeUpsert(), SETTINGS)
        with pytest.raises(InvalidArgumentError, match="at least one document"):
            await runner.submit("col", [])
        with pytest.raises(NotFoundError):
            await runner.get("nope")

    run(scenario())


def test_batches_are_pipelined_and_progress_is_recorded_in_order(catalog: Catalog, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"pipeline_batches": 3})
    in_flight, most = 0, 0
    release_first = asyncio.Event()
    seen_done: list[int] = []

    async def upsert(collection: str, documents: Sequence[DocumentIn]) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            if documents[0].id == "d0":
                await release_first.wait()  # the first batch lands last
            else:
                await asyncio.sleep(0.01)
            return len(documents)
        finally:
            in_flight -= 1

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, settings)
        await runner.start()
        job_id = await runner.submit("col", docs(12))
        await asyncio.sleep(0.1)  # batches 2 and 3 have landed, batch 1 has not
        seen_done.append((await runner.get(job_id)).done)
        release_first.set()
        info = await runner.wait(job_id)
        seen_done.append(info.done)
        await runner.close()

    run(scenario())
    assert most == 3
    assert seen_done == [0, 12]  # the resume point never passes a batch that has not landed


def test_upserts_over_the_pending_limit_are_refused_and_nothing_is_written(catalog: Catalog, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"max_pending_documents": 10})
    upsert = FakeUpsert(gate_after=0)  # the first job stays pending

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, settings)
        await runner.start()
        first = await runner.submit("col", docs(6))
        with pytest.raises(ResourceExhaustedError, match=r"over the limit of 10 \(ingest.max_pending_documents\)"):
            await runner.submit("col", docs(5))
        assert [job.id for job in await runner.list_jobs()] == [first]
        assert len(catalog.job_documents(first, 0, 100)) == 6
        await runner.submit("col", docs(4))  # within the limit
        await runner.close()

    run(scenario())


def test_a_job_pauses_while_the_embedder_is_not_ready_without_spending_attempts(
    catalog: Catalog, tmp_path: Path
) -> None:
    upsert = FakeUpsert(script=[UnavailableError("triton down")] * 6)  # more failures than max_attempts
    checks: list[bool] = []

    async def ready() -> bool:
        """Down while the script has failures left: each check while down ends one of them."""
        checks.append(not upsert.script)
        if upsert.script:
            upsert.script.pop()
        return checks[-1]

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, SETTINGS, ready=ready)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(3)))
        await runner.close()
        assert (info.status, info.done, info.failed) == (JobStatus.succeeded, 3, 0)

    run(scenario())
    assert len(upsert.calls) == 2  # the failed call, then the one after the pause
    assert checks == [False] * 5 + [True]


def test_a_pause_longer_than_max_pause_stops_the_job(catalog: Catalog, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"max_pause_s": 0.05})
    upsert = FakeUpsert(script=[UnavailableError("triton down")])

    async def never_ready() -> bool:
        return False

    async def scenario() -> None:
        runner = JobRunner(catalog, upsert, settings, ready=never_ready)
        await runner.start()
        info = await runner.wait(await runner.submit("col", docs(2)))
        await runner.close()
        assert (info.status, info.failed) == (JobStatus.failed, 2)
        assert info.errors[0].error == "triton down (not ready for 0.05 s)"

    run(scenario())

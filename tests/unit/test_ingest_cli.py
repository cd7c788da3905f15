"""The ingest loop of ``tritonrag ingest`` with a stand-in API client: batching, resume, bad documents,
transient failures (backoff, ``Retry-After``, smaller batches, giving up), jobs."""

from __future__ import annotations

import email.utils
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import httpx2
import pytest

from tests.clock import FakeClock
from tritonrag.clients.http_client import ApiError, TritonRagClient
from tritonrag.clients.ingest import (
    Failure,
    Ingestion,
    IngestState,
    RetryPolicy,
    ServerUnavailableError,
)
from tritonrag.clients.progress import Progress
from tritonrag.clients.wire.schema import (
    Chunking,
    CollectionCreate,
    CollectionInfo,
    DocumentError,
    DocumentIn,
    IndexType,
    JobInfo,
    JobStatus,
    Language,
    UpsertResult,
)


def unavailable(retry_after_s: float | None = None) -> ApiError:
    return ApiError(503, "UNAVAILABLE", "no Triton endpoint can serve 'embedder' now", retry_after_s=retry_after_s)


class StandInClient:
    """Accepts documents unless their text contains "bad" (422) or the request is over ``max_chars`` (413).

    ``outages`` are raised by the next calls, one per call, before anything else; ``jobs`` are the states a
    job goes through, one per poll, when an upsert is of more than ``inline_max`` documents.
    """

    def __init__(
        self,
        outages: Iterable[Exception] = (),
        max_chars: int = 10_000,
        inline_max: int = 1000,
        jobs: Iterable[JobInfo | Exception] = (),
    ) -> None:
        self.calls: list[list[str]] = []
        self.polls = 0
        self.collections: set[str] = {"c"}
        self._outages = deque(outages)
        self._max_chars = max_chars
        self._inline_max = inline_max
        self._jobs = deque(jobs)

    def _outage(self) -> None:
        if self._outages:
            raise self._outages.popleft()

    def upsert(self, collection: str, documents: list[DocumentIn]) -> UpsertResult:
        self.calls.append([d.id for d in documents])
        self._outage()
        if sum(len(d.text) for d in documents) > self._max_chars:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", "the request body is over the limit")
        if any("bad" in d.text for d in documents):
            raise ApiError(422, "INVALID_ARGUMENT", "bad text")
        job_id = "job-1" if len(documents) > self._inline_max else None
        return UpsertResult(collection=collection, documents=len(documents), chunks=2 * len(documents), job_id=job_id)

    def get_job(self, job_id: str) -> JobInfo:
        self.polls += 1
        state = self._jobs.popleft()
        if isinstance(state, Exception):
            raise state
        return state

    def get_collection(self, name: str) -> CollectionInfo:
        self._outage()
        if name not in self.collections:
            raise ApiError(404, "NOT_FOUND", f"collection {name!r} not found")
        return CollectionInfo(
            name=name,
            chunking=Chunking(),
            index_type=IndexType.flat,
            language=Language.english,
            active_index="flat",
            documents=0,
            chunks=0,
            size_bytes=0,
            revision=0,
            embedder=None,
            created_at=0.0,
        )

    def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        self.collections.add(request.name)
        return self.get_collection(request.name)


class Recorder:
    """A reporter that keeps what it is told, and a sleep that moves a fake clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.lines: list[str] = []
        self.failures: list[Failure] = []
        self.retries: list[tuple[int, float]] = []
        self.sleeps: list[float] = []

    def progress(self, progress: Progress) -> None:
        self.lines.append(f"{progress.done}+{progress.failed}/{progress.total}")

    def failed(self, failures: Sequence[Failure]) -> None:
        self.failures.extend(failures)

    def retrying(self, error: Exception, attempt: int, delay_s: float) -> None:
        self.retries.append((attempt, delay_s))

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds


def ingestion(
    client: StandInClient,
    documents: list[DocumentIn],
    state_file: Path,
    batch: int,
    recorder: Recorder | None = None,
    policy: RetryPolicy | None = None,
    rng: Callable[[], float] = lambda: 1.0,
) -> Ingestion:
    recorder = recorder or Recorder()
    return Ingestion(
        cast(TritonRagClient, client),
        "c",
        documents,
        IngestState(state_file),
        recorder,
        batch,
        policy or RetryPolicy(),
        sleep=recorder.sleep,
        clock=recorder.clock,
        rng=rng,
    )


def docs(*texts: str) -> list[DocumentIn]:
    return [DocumentIn(id=f"d{i}", text=t) for i, t in enumerate(texts)]


def job(status: JobStatus, done: int, failed: int = 0, errors: Sequence[tuple[str, str]] = ()) -> JobInfo:
    return JobInfo(
        id="job-1",
        collection="c",
        status=status,
        total=4,
        done=done,
        failed=failed,
        errors=[DocumentError(doc_id=doc_id, error=error) for doc_id, error in errors],
        created_at=0.0,
        updated_at=0.0,
    )


def test_a_bad_document_fails_alone_even_in_a_batch_of_one(tmp_path: Path) -> None:
    client, recorder = StandInClient(), Recorder()
    progress = ingestion(
        client, docs("fine", "bad one", "fine too", "bad two", "fine again"), tmp_path / "s", 2, recorder
    ).run()
    assert (progress.done, progress.failed, progress.chunks) == (3, 2, 6)
    reason = "422 INVALID_ARGUMENT: bad text"
    assert recorder.failures == [Failure("d1", reason), Failure("d3", reason)]
    assert client.calls == [["d0", "d1"], ["d0"], ["d1"], ["d2", "d3"], ["d2"], ["d3"], ["d4"]]
    assert recorder.retries == [] and recorder.sleeps == []


def test_a_rerun_sends_only_what_is_new_or_changed(tmp_path: Path) -> None:
    ingestion(StandInClient(), docs("one", "two", "three"), tmp_path / "s", 2).run()
    client = StandInClient()
    run = ingestion(client, docs("one", "two changed", "three"), tmp_path / "s", 2)
    run.run()
    assert client.calls == [["d1"]] and (run.progress.total, run.already_there) == (1, 2)


def test_a_batch_too_large_is_halved_until_the_oversized_document_is_alone(tmp_path: Path) -> None:
    client, recorder = StandInClient(max_chars=100), Recorder()
    texts = ["a" * 30, "b" * 30, "c" * 30, "d" * 150, "e" * 30, "f" * 30]
    progress = ingestion(client, docs(*texts), tmp_path / "s", 6, recorder).run()
    assert (progress.done, progress.failed) == (5, 1)
    assert recorder.failures == [Failure("d3", "413 PAYLOAD_TOO_LARGE: the request body is over the limit")]
    assert client.calls == [
        ["d0", "d1", "d2", "d3", "d4", "d5"],
        ["d0", "d1", "d2"],
        ["d3", "d4", "d5"],
        ["d3"],
        ["d4", "d5"],
    ]


def test_transient_failures_are_retried_with_jittered_exponential_backoff(tmp_path: Path) -> None:
    outages = [unavailable(), httpx2.ConnectError("connection refused"), httpx2.ReadTimeout("timed out")]
    client, recorder = StandInClient(outages=outages), Recorder()
    draws = iter([1.0, 0.0, 0.5])
    policy = RetryPolicy(base_delay_s=2.0)
    progress = ingestion(client, docs("one"), tmp_path / "s", 1, recorder, policy, lambda: next(draws)).run()
    assert progress.done == 1 and client.calls == [["d0"]] * 4
    # 2 s, then 4 s and 8 s, each drawn between half and all of it
    assert recorder.sleeps == [2.0, 2.0, 6.0]
    assert recorder.retries == [(1, 2.0), (2, 2.0), (3, 6.0)]


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    client, recorder = (
        StandInClient(outages=[ApiError(429, "RESOURCE_EXHAUSTED", "busy", retry_after_s=7.5)]),
        Recorder(),
    )
    ingestion(client, docs("one"), tmp_path / "s", 1, recorder).run()
    assert recorder.sleeps == [7.5]


def test_a_batch_failing_transiently_is_split_and_the_next_batches_start_smaller(tmp_path: Path) -> None:
    client, recorder = StandInClient(outages=[unavailable(), unavailable()]), Recorder()
    progress = ingestion(client, docs(*"abcdefghij"), tmp_path / "s", 8, recorder).run()
    assert progress.done == 10
    assert client.calls == [
        ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"],  # 503: wait, then halves
        ["d0", "d1", "d2", "d3"],  # 503: wait, then halves
        ["d0", "d1"],
        ["d2", "d3"],  # each success lets batches grow by one: 2, 3, 4, ...
        ["d4", "d5", "d6", "d7"],
        ["d8", "d9"],
    ]
    assert len(recorder.sleeps) == 2


def test_the_run_stops_when_the_server_stays_unavailable_and_a_rerun_resumes(tmp_path: Path) -> None:
    client, recorder = StandInClient(outages=[unavailable()] * 100), Recorder()
    policy = RetryPolicy(max_attempts=4, base_delay_s=1.0)
    documents = docs("one", "two", "three")
    first = ingestion(StandInClient(), documents[:1], tmp_path / "s", 1).run()
    assert first.done == 1
    run = ingestion(client, documents, tmp_path / "s", 1, recorder, policy)
    with pytest.raises(ServerUnavailableError, match=r"4 attempts over 7 s\); last error: 503 UNAVAILABLE"):
        run.run()
    assert recorder.sleeps == [1.0, 2.0, 4.0] and run.progress.done == 0

    healthy = StandInClient()
    rerun = ingestion(healthy, documents, tmp_path / "s", 1)
    rerun.run()
    assert healthy.calls == [["d1"], ["d2"]] and rerun.already_there == 1


def test_the_time_budget_bounds_the_retries(tmp_path: Path) -> None:
    client, recorder = StandInClient(outages=[httpx2.ReadTimeout("timed out")] * 100), Recorder()
    policy = RetryPolicy(max_attempts=100, max_wait_s=20.0, base_delay_s=1.0, max_delay_s=30.0)
    with pytest.raises(ServerUnavailableError, match=r"5 attempts over 15 s\); last error: ReadTimeout: timed out"):
        ingestion(client, docs("one"), tmp_path / "s", 1, recorder, policy).run()
    assert recorder.sleeps == [1.0, 2.0, 4.0, 8.0]  # the next wait (16 s) would end past 20 s


def test_an_answer_between_outages_restarts_the_count(tmp_path: Path) -> None:
    outages = [unavailable(), unavailable(), ApiError(422, "INVALID_ARGUMENT", "bad text"), unavailable()]
    client, recorder = StandInClient(outages=outages), Recorder()
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0)
    progress = ingestion(client, docs("one", "two"), tmp_path / "s", 1, recorder, policy).run()
    assert (progress.done, progress.failed) == (1, 1)
    assert recorder.retries == [(1, 1.0), (2, 2.0), (1, 1.0)]


def test_a_fatal_answer_stops_the_run(tmp_path: Path) -> None:
    client = StandInClient(outages=[ApiError(404, "NOT_FOUND", "collection 'c' not found")])
    with pytest.raises(ApiError, match="404 NOT_FOUND"):
        ingestion(client, docs("one", "two"), tmp_path / "s", 2).run()
    assert client.calls == [["d0", "d1"]]


def test_a_job_is_polled_through_transient_failures_and_its_failures_reported(tmp_path: Path) -> None:
    states: list[JobInfo | Exception] = [
        job(JobStatus.running, 1),
        unavailable(),
        job(JobStatus.running, 2, 1),
        job(JobStatus.succeeded, 3, 1, [("d2", "document 'd2': text is too long")]),
    ]
    client, recorder = StandInClient(inline_max=2, jobs=states), Recorder()
    run = ingestion(client, docs("one", "two", "three", "four"), tmp_path / "s", 4, recorder)
    progress = run.run()
    assert client.calls == [["d0", "d1", "d2", "d3"]] and client.polls == 4  # a failed poll resubmits nothing
    assert (progress.done, progress.failed) == (3, 1)
    assert recorder.lines == ["0+0/4", "1+0/4", "2+1/4", "3+1/4"]
    assert recorder.failures == [Failure("d2", "document 'd2': text is too long")]
    assert sorted(IngestState(tmp_path / "s").done) == ["d0", "d1", "d3"]


def test_a_job_that_names_only_some_failures_records_no_document(tmp_path: Path) -> None:
    states: list[JobInfo | Exception] = [job(JobStatus.succeeded, 1, 3, [("d0", "stopped: Triton unavailable")])]
    client, recorder = StandInClient(inline_max=2, jobs=states), Recorder()
    progress = ingestion(client, docs("one", "two", "three", "four"), tmp_path / "s", 4, recorder).run()
    assert (progress.done, progress.failed) == (1, 3)
    assert recorder.failures == [
        Failure("d0", "stopped: Triton unavailable"),
        Failure("job job-1", "2 more documents failed (the job names the first ones)"),
    ]
    assert IngestState(tmp_path / "s").done == {}


def test_the_collection_is_created_when_missing_after_transient_failures(tmp_path: Path) -> None:
    client, recorder = StandInClient(outages=[httpx2.ConnectError("refused")]), Recorder()
    client.collections.clear()
    ingestion(client, docs("one"), tmp_path / "s", 1, recorder).ensure_collection(create=True)
    assert client.collections == {"c"} and len(recorder.sleeps) == 1
    client.collections.clear()
    with pytest.raises(ApiError, match="404"):
        ingestion(client, docs("one"), tmp_path / "s", 1).ensure_collection(create=False)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (lambda: "12", 12.0),
        (lambda: "0.5", 0.5),
        (lambda: email.utils.formatdate(time.time() + 60, usegmt=True), 60.0),  # an HTTP date a minute away
        (lambda: "soon", None),
    ],
)
def test_the_client_reads_retry_after(header: Callable[[], str], expected: float | None) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        body = {"error": {"code": "UNAVAILABLE", "message": "busy"}}
        return httpx2.Response(503, json=body, headers={"retry-after": header()})

    client = TritonRagClient("http://api")
    client._http = httpx2.Client(base_url="http://api", transport=httpx2.MockTransport(answer))
    with client, pytest.raises(ApiError) as raised:
        client.get_collection("c")
    assert raised.value.status == 503 and raised.value.message == "busy"
    if expected is None:
        assert raised.value.retry_after_s is None
    else:
        assert raised.value.retry_after_s == pytest.approx(expected, abs=1.5)  # a date counts whole seconds

"""Beyond one machine, as real processes on loopback: a real PostgreSQL as the shared store, a real Redis as Celery's
broker, one Triton with the tiny models, two `tritonrag serve` replicas and `tritonrag worker` processes.

A write through one replica is read through the other (at once with ``min_revision``, else once the other follows
the store); a replica killed during an ingest loses nothing it acknowledged while the other keeps serving; a worker
killed in the middle of a job leaves the job to another, which ends it with exactly the chunks an unbroken run
makes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.documents import pydoc_documents
from tests.serving import (
    ADMIN_HEADERS,
    Orchestrator,
    RedisServer,
    orchestrator_env,
    start_orchestrator,
    stop_orchestrator,
)
from tests.serving import wait_until as wait_for_process
from tritonrag.deploy.launcher import TritonServer

FOLLOW_INTERVAL_S = "1"


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """`tests.serving.wait_until` at a pace within the API's rate limits."""
    wait_for_process(ready, what, process, timeout_s, poll_s=0.2)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def shared_env(triton: TritonServer, repository: Path, data_dir: Path, store_url: str, **extra: str) -> dict[str, str]:
    """An orchestrator's (or worker's) environment over the shared store ``store_url``, with its own ``data_dir``."""
    return orchestrator_env(
        triton,
        repository,
        data_dir,
        TRITONRAG_STORE__URL=store_url,
        TRITONRAG_STORE__FOLLOW_INTERVAL_S=FOLLOW_INTERVAL_S,
        **extra,
    )


@pytest.fixture
def replicas(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path, postgres_url: str
) -> Iterator[tuple[Orchestrator, Orchestrator]]:
    started = [
        start_orchestrator(shared_env(tiny_triton, tiny_repository, tmp_path / name, postgres_url))
        for name in ("a", "b")
    ]
    yield started[0], started[1]
    for replica in started:
        stop_orchestrator(replica)


def client(replica: Orchestrator) -> httpx2.Client:
    return httpx2.Client(base_url=replica.http_url, timeout=30, headers=ADMIN_HEADERS)


def sparse_ids(http: httpx2.Client, collection: str, query: str, **body: Any) -> set[str]:
    response = http.post("/v1/search", json={"collection": collection, "query": query, "mode": "sparse", **body})
    assert response.status_code == 200, response.text
    return {hit["doc_id"] for hit in response.json()["hits"]}


def test_a_write_through_one_replica_is_read_through_the_other(replicas: tuple[Orchestrator, Orchestrator]) -> None:
    first, second = replicas
    with client(first) as a, client(second) as b:
        assert a.post("/v1/collections", json={"name": "notes"}).status_code == 201
        owls = {"id": "owls", "text": "Owls hunt at night and see well in the dark."}
        written = a.post("/v1/collections/notes/documents", json={"documents": [owls]}).json()
        assert written["revision"] == 1
        assert sparse_ids(b, "notes", "owls hunt", min_revision=written["revision"]) == {"owls"}

        foxes = {"id": "foxes", "text": "Foxes are small omnivores of the dog family."}
        assert a.post("/v1/collections/notes/documents", json={"documents": [foxes]}).json()["revision"] == 2
        wait_until(lambda: sparse_ids(b, "notes", "omnivores") == {"foxes"}, "replica b to follow", None, 30)

        ahead = b.post("/v1/search", json={"collection": "notes", "query": "owls", "min_revision": 99})
        assert ahead.status_code == 422 and "min_revision" in ahead.text

        assert b.delete("/v1/collections/notes/documents/owls").status_code in (200, 204)
        wait_until(lambda: sparse_ids(a, "notes", "owls hunt") == set(), "replica a to follow the delete", None, 30)


def test_sigkill_of_a_replica_during_an_ingest_loses_nothing_and_the_other_keeps_serving(
    replicas: tuple[Orchestrator, Orchestrator],
) -> None:
    first, second = replicas
    documents = pydoc_documents(per_module=2)
    acknowledged: list[tuple[str, int]] = []  # (doc id, revision)
    search_errors: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        with client(first) as a:
            for document in documents:
                try:
                    response = a.post("/v1/collections/docs/documents", json={"documents": [document.model_dump()]})
                except httpx2.TransportError:
                    return
                if response.status_code == 200:
                    acknowledged.append((document.id, response.json()["revision"]))

    def search() -> None:
        with client(second) as b:
            while not stop.is_set():
                response = b.post("/v1/search", json={"collection": "docs", "query": "return the value"})
                if response.status_code != 200:
                    search_errors.append(response.text)
                time.sleep(0.05)  # within the rate limit of searches

    with client(first) as a:
        assert a.post("/v1/collections", json={"name": "docs"}).status_code == 201
    threads = [threading.Thread(target=ingest), threading.Thread(target=search)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 20, "20 acknowledged upserts", first.process, 120)
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    time.sleep(2)  # replica b serves on alone
    stop.set()
    for thread in threads:
        thread.join()
    assert search_errors == []

    last_id, last_revision = acknowledged[-1]
    text = {document.id: document.text for document in documents}
    with client(second) as b:
        for doc_id, _ in acknowledged:
            assert b.get(f"/v1/collections/docs/documents/{doc_id}").json()["text"] == text[doc_id]
        info = b.get("/v1/collections/docs").json()
        assert info["documents"] in (len(acknowledged), len(acknowledged) + 1)  # + the one in flight at the kill
        words = " ".join(text[last_id].split()[:12])
        assert last_id in sparse_ids(b, "docs", words, min_revision=last_revision, top_k=20)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`tritonrag worker` with ``env``, logging into ``log``; returned once Celery says it is ready."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tritonrag.deploy.cli", "worker"], env=env, stdout=out, stderr=out
        )
    wait_until(lambda: b"ready" in log.read_bytes(), f"the worker to start (see {log})", process, 90)
    return process


def job_info(http: httpx2.Client, job_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


def test_sigkill_of_a_worker_mid_job_leaves_the_job_to_another_with_exactly_the_right_chunks(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    jobs = {
        "TRITONRAG_INGEST__BROKER_URL": redis_server.url,
        "TRITONRAG_INGEST__JOB_LEASE_S": "3",
        "TRITONRAG_INGEST__INLINE_MAX_DOCUMENTS": "4",
        "TRITONRAG_INGEST__BATCH_DOCUMENTS": "4",
    }

    def env(name: str) -> dict[str, str]:
        return shared_env(tiny_triton, tiny_repository, tmp_path / name, postgres_url, **jobs)

    orchestrator = start_orchestrator(env("o"))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers.append(start_worker(env("w1"), tmp_path / "w1.log"))
        documents = [document.model_dump() for document in pydoc_documents(per_module=3)]
        with client(orchestrator) as http:
            for name in ("killed", "reference"):
                assert http.post("/v1/collections", json={"name": name}).status_code == 201
            submitted = http.post("/v1/collections/killed/documents", json={"documents": documents}).json()
            job_id = submitted["job_id"]
            assert job_id and submitted["revision"] is None
            wait_until(lambda: job_info(http, job_id)["done"] >= 8, "the first worker's progress", workers[0], 120)
            os.kill(workers[0].pid, signal.SIGKILL)
            workers[0].wait()
            assert job_info(http, job_id)["status"] == "running"
            workers.append(start_worker(env("w2"), tmp_path / "w2.log"))
            wait_until(lambda: job_info(http, job_id)["status"] != "running", "the second worker", workers[1], 300)
            finished = job_info(http, job_id)
            assert (finished["status"], finished["done"], finished["failed"]) == ("succeeded", len(documents), 0)

            reference = http.post("/v1/collections/reference/documents", json={"documents": documents}).json()
            wait_until(lambda: job_info(http, reference["job_id"])["status"] == "succeeded", "the reference", None, 300)

            def followed(name: str) -> bool:
                return bool(http.get(f"/v1/collections/{name}").json()["documents"] == len(documents))

            for name in ("killed", "reference"):
                wait_until(partial(followed, name), f"the orchestrator to follow {name}", None, 30)
            killed, unbroken = (http.get(f"/v1/collections/{name}").json() for name in ("killed", "reference"))
            assert killed["chunks"] == unbroken["chunks"] > len(documents)
            for document in documents[:: max(1, len(documents) // 20)]:
                chunks = [
                    http.get(f"/v1/collections/{name}/documents/{document['id']}").json()["chunks"]
                    for name in ("killed", "reference")
                ]
                assert chunks[0] == chunks[1]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(timeout=30)
        stop_orchestrator(orchestrator)

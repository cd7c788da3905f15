"""The operator's path end to end: a real ``tritonrag serve`` over a real tritonserver serving tiny models; versions of
the embedder (with its blue/green re-index), the reranker (canary) and the generator published and rolled back with
``tritonrag models …`` while clients search and ask ``/v1/query`` without a pause. No request may fail, and every
dense search must be consistent with exactly one embedder version.

The consistency probe: a dense search for the exact text of a stored one-chunk document finds it at cosine 1.0 only
when the query and the index come from the same embedder version (the two versions differ in weights and width).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.documents import pydoc_documents
from tests.serving import orchestrator_env, running_triton, start_orchestrator, stop_orchestrator
from tests.tiny_models import tiny_causal_lm, tiny_cross_encoder, tiny_embedder, wider_embedder
from tritonrag.clients.http_client import ApiError, TritonRagClient
from tritonrag.clients.wire.models import VersionState
from tritonrag.clients.wire.schema import (
    Chunking,
    CollectionCreate,
    DocumentIn,
    QueryRequest,
    SamplingParams,
    SearchMode,
    SearchRequest,
)
from tritonrag.export.exporter import export_model

COLLECTION = "manuals"
PROBES = [
    DocumentIn(id=f"probe-{n}", text=text)
    for n, text in enumerate(
        [
            "Canary releases move traffic in steps.",
            "A rollback restores the previous model version.",
            "Blue green indexing builds the new index beside the old.",
        ]
    )
]


class Clients:
    """Threads that search (dense, the probes) and ask questions without a pause; every failure is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []
        self.inconsistent: list[str] = []
        self.searches = self.answers = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._search), threading.Thread(target=self._ask)]
        for thread in self._threads:
            thread.start()

    def _search(self) -> None:
        with TritonRagClient(self.url) as client:
            while not self._stop.is_set():
                for probe in PROBES:
                    request = SearchRequest(
                        collection=COLLECTION, query=probe.text, mode=SearchMode.dense, top_k=3, use_cache=False
                    )
                    try:
                        hits = client.search(request).hits
                    except ApiError as exc:
                        self.failures.append(f"search: {exc}")
                        continue
                    self.searches += 1
                    if not hits or hits[0].doc_id != probe.id or hits[0].score < 0.999:
                        self.inconsistent.append(f"{probe.id}: {[(h.doc_id, round(h.score, 4)) for h in hits]}")

    def _ask(self) -> None:
        question = QueryRequest(
            collection=COLLECTION,
            query="How does a canary release move traffic?",
            rerank=True,
            sampling=SamplingParams(max_tokens=8),
            use_cache=False,
        )
        with TritonRagClient(self.url) as client:
            while not self._stop.is_set():
                try:
                    answer = client.query(question)
                except ApiError as exc:
                    self.failures.append(f"query: {exc}")
                    continue
                if answer.degraded:
                    self.failures.append(f"query degraded: {answer.degraded}")
                self.answers += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def models_cli(url: str, *args: str) -> str:
    """``tritonrag models …`` against the orchestrator at ``url``; its output (the test fails on a non-zero exit)."""
    command = [sys.executable, "-m", "tritonrag.deploy.cli", "models", *args, "--url", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}\n{result.stderr}"
    print(f"$ tritonrag models {' '.join(args)}\n{result.stdout}")
    return result.stdout


def until(condition: Callable[[], bool], what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    embedder = tiny_embedder(folder / "embedder", pooling="mean")
    return {
        "embedder": embedder,
        "wider_embedder": wider_embedder(embedder, folder / "wider-embedder"),
        "reranker": tiny_cross_encoder(folder / "reranker"),
        "generator": tiny_causal_lm(folder / "generator"),
    }


@pytest.fixture
def stack(sources: dict[str, Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    repository = tmp_path / "repository"
    export_model(f"path:{sources['embedder']}", "embedder", repository, max_sequence_length=32)
    export_model(f"path:{sources['reranker']}", "reranker", repository, max_sequence_length=64)
    export_model(f"path:{sources['generator']}", "generator", repository, max_sequence_length=512)
    with running_triton(repository, ["embedder", "reranker", "generator"], tmp_path / "work") as triton:
        env = orchestrator_env(
            triton,
            repository,
            tmp_path / "data",
            TRITONRAG_ROLLOUT__CANARY_STEPS="[0.25, 0.5]",
            TRITONRAG_ROLLOUT__STEP_DWELL_S="1",
            TRITONRAG_ROLLOUT__MIN_REQUESTS="3",
            TRITONRAG_ROLLOUT__MAX_LATENCY_RATIO="4",  # a busy 2-core machine: latency is not what is tested here
            TRITONRAG_ROLLOUT__WATCH_INTERVAL_S="0",  # versions arrive by the CLI here (test_rollouts: the watcher)
            TRITONRAG_RATE_LIMITS__ENABLED="false",
        )
        orchestrator = start_orchestrator(env, timeout_s=120)
        try:
            yield orchestrator.http_url, repository
        finally:
            stop_orchestrator(orchestrator)


def test_publish_and_roll_back_every_model_under_load_fails_no_request(
    stack: tuple[str, Path], sources: dict[str, Path]
) -> None:
    url, repository = stack
    with TritonRagClient(url) as client:
        client.create_collection(
            CollectionCreate(name=COLLECTION, chunking=Chunking(chunk_tokens=24, overlap_tokens=4))
        )
        documents = [*PROBES, *pydoc_documents(per_module=3)]
        for start in range(0, len(documents), 32):
            result = client.upsert(COLLECTION, documents[start : start + 32])
            if result.job_id:
                client.wait_for_job(result.job_id)
        assert client.get_collection(COLLECTION).embedder.version == "1"  # type: ignore[union-attr]

        clients = Clients(url)
        try:
            # The embedder: exported by the CLI, stable for new work at once, the collection re-indexed beside.
            source = f"path:{sources['wider_embedder']}"
            models_cli(url, "publish", "embedder", "--source", source, "--repository", str(repository))
            until(lambda: _pinned(client) == ("2", False), "the collection's switch to embedder version 2")

            # The reranker: a canary through its steps.
            export_model(f"path:{sources['reranker']}", "reranker", repository, max_sequence_length=64)
            out = models_cli(url, "publish", "reranker", "--version", "2", "--policy", "canary", "--wait")
            assert out.startswith("reranker (reranker): stable 2")

            # The generator: at once.
            export_model(f"path:{sources['generator']}", "generator", repository, max_sequence_length=512)
            models_cli(url, "publish", "generator", "--version", "2", "--policy", "immediate")

            # And back, each of them.
            for model in ("generator", "reranker", "embedder"):
                models_cli(url, "rollback", model, "--reason", "drill")
            until(lambda: _pinned(client) == ("1", False), "the collection's switch back to embedder version 1")
            time.sleep(3)  # the clients keep going a while on the restored versions
        finally:
            clients.stop()

        status = {s.name: s for s in client.model_statuses()}
        models_cli(url, "status")
    assert clients.failures == []
    assert clients.inconsistent == []
    assert clients.searches > 50 and clients.answers > 5
    for model in ("embedder", "reranker", "generator"):
        states = {v.version: v.state for v in status[model].versions}
        assert states == {"1": VersionState.stable, "2": VersionState.rolled_back}, model
        assert status[model].stable == "1"


def _pinned(client: TritonRagClient) -> tuple[str, bool]:
    info = client.get_collection(COLLECTION)
    assert info.embedder is not None
    return info.embedder.version, info.reindex is not None

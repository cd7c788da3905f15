"""Serving loses no retrieval quality: dense top-10 through the whole stack equals an exact search
over the same model's embeddings computed in-process with PyTorch."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import numpy as np
import pytest

from tests import reference
from tests.serving import (
    ADMIN_HEADERS,
    Orchestrator,
    orchestrator_env,
    running_triton,
    start_orchestrator,
    stop_orchestrator,
)

# "this" prints a poem and "antigravity" opens a web browser when imported.
MODULES = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in {"this", "antigravity"})


def passages() -> dict[str, str]:
    """First paragraphs of standard-library module docs: short real English texts, one chunk each."""
    found: dict[str, str] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # some modules refuse to import on this platform
            continue
        doc = inspect.getdoc(module) or ""
        paragraph = doc.split("\n\n")[0].replace("\n", " ").strip()
        if 40 <= len(paragraph) <= 600:
            found[name] = paragraph
    return found


QUERIES = [
    "How do I parse command line arguments?",
    "compress files with gzip",
    "regular expression matching",
    "send an email over SMTP",
    "work with dates and times",
    "read and write CSV files",
    "generate random numbers",
    "serialize Python objects to bytes",
    "run a child process",
    "decimal fixed point arithmetic",
]


@pytest.fixture(scope="module")
def stack(bundled_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    with running_triton(bundled_repository, ["embedder", "reranker"], tmp_path_factory.mktemp("work")) as triton:
        orchestrator = start_orchestrator(orchestrator_env(triton, bundled_repository, tmp_path_factory.mktemp("data")))
        try:
            yield orchestrator
        finally:
            stop_orchestrator(orchestrator)


def test_served_dense_top10_equals_exact_search(stack: Orchestrator, minilm_dir: Path) -> None:
    texts = passages()
    assert len(texts) >= 80
    ids = list(texts)
    with httpx2.Client(base_url=stack.http_url, timeout=120, headers=ADMIN_HEADERS) as http:
        assert http.post("/v1/collections", json={"name": "stdlib", "index_type": "flat"}).status_code == 201
        for start in range(0, len(ids), 50):
            batch = [{"id": i, "text": texts[i]} for i in ids[start : start + 50]]
            response = http.post("/v1/collections/stdlib/documents", json={"documents": batch})
            assert response.status_code == 200, response.text
        assert http.get("/v1/collections/stdlib").json()["chunks"] == len(ids)  # one chunk per passage
        served = {
            q: [
                h["doc_id"]
                for h in http.post(
                    "/v1/search", json={"collection": "stdlib", "query": q, "mode": "dense", "top_k": 10}
                ).json()["hits"]
            ]
            for q in QUERIES
        }

    vectors = reference.embeddings(minilm_dir, [texts[i] for i in ids], max_length=256)
    queries = reference.embeddings(minilm_dir, QUERIES, max_length=256)
    identical = 0
    for query, query_vector in zip(QUERIES, queries, strict=True):
        exact_scores = vectors @ query_vector
        exact = [ids[i] for i in np.argsort(-exact_scores)[:10]]
        identical += served[query] == exact
        # Where the lists differ, it is only by near-ties: the served top-10 is as good as the exact one.
        served_scores = sorted((float(exact_scores[ids.index(d)]) for d in served[query]), reverse=True)
        assert np.allclose(served_scores, np.sort(exact_scores)[::-1][:10], atol=2e-3), (query, served[query], exact)
    assert identical >= len(QUERIES) - 1, f"only {identical} of {len(QUERIES)} top-10 lists are identical"


def test_grpc_health_answers(stack: Orchestrator) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(stack.grpc_url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

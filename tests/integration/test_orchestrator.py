"""The orchestrator as a real ``tritonrag serve`` process over a real Triton with tiny models.

HTTP through a real socket, gRPC through a real channel, SQLite and FAISS on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx2
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.documents import JAPANESE, LATIN_1, RUSSIAN, SMALL_MODULES, mixed_corpus
from tests.serving import (
    ADMIN_HEADERS,
    ADMIN_METADATA,
    MetadataInterceptor,
    Orchestrator,
    orchestrator_env,
    start_orchestrator,
    stop_orchestrator,
)
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.deploy.launcher import TritonServer

DOCS = [
    {
        "id": "paris",
        "text": "Paris is the capital of France and sits on the Seine.",
        "metadata": {"year": 2020, "lang": "en"},
    },
    {
        "id": "berlin",
        "text": "Berlin is the capital of Germany, on the Spree.",
        "metadata": {"year": 2021, "lang": "en"},
    },
    {
        "id": "madrid",
        "text": "Madrid es la capital de España.",
        "metadata": {"year": 2019, "lang": "es", "tags": ["city", "spain"]},
    },
    {
        "id": "tea",
        "text": "Green tea is brewed at a lower temperature than black tea.",
        "metadata": {"year": 2022, "lang": "en"},
    },
]


@pytest.fixture(scope="module")
def orchestrator(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orchestrator]:
    env = orchestrator_env(
        tiny_triton,
        tiny_repository,
        tmp_path_factory.mktemp("data"),
        TRITONRAG_INGEST__INLINE_MAX_DOCUMENTS="8",
        TRITONRAG_API__MAX_REQUEST_BYTES="65536",
    )
    server = start_orchestrator(env)
    yield server
    stop_orchestrator(server)


@pytest.fixture(scope="module")
def http(orchestrator: Orchestrator) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=orchestrator.http_url, timeout=60, headers=ADMIN_HEADERS) as client:
        yield client


@pytest.fixture(scope="module")
def stub(orchestrator: Orchestrator) -> Iterator[pb_grpc.TritonRagStub]:
    with grpc.insecure_channel(orchestrator.grpc_url) as channel:
        yield pb_grpc.TritonRagStub(grpc.intercept_channel(channel, MetadataInterceptor(ADMIN_METADATA)))


@pytest.fixture(scope="module")
def cities(http: httpx2.Client) -> str:
    """A collection holding ``DOCS``."""
    assert http.post("/v1/collections", json={"name": "cities", "index_type": "flat"}).status_code == 201
    upserted = http.post("/v1/collections/cities/documents", json={"documents": DOCS})
    assert upserted.status_code == 200, upserted.text
    assert upserted.json()["documents"] == 4 and upserted.json()["chunks"] == 4
    return "cities"


def search(http: httpx2.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/search", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_sparse_search_finds_the_matching_document(http: httpx2.Client, cities: str) -> None:
    hits = search(http, collection=cities, query="capital of Germany", mode="sparse", top_k=2)["hits"]
    assert hits[0]["doc_id"] == "berlin"
    assert hits[0]["text"] == DOCS[1]["text"] and (hits[0]["start"], hits[0]["end"]) == (0, len(DOCS[1]["text"]))
    assert hits[0]["metadata"] == {"year": 2021, "lang": "en"}
    assert set(hits[0]["scores"]) == {"sparse", "document", "fused"}


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_dense_and_hybrid_return_k_hits_with_stage_scores_and_timings(
    http: httpx2.Client, cities: str, mode: str
) -> None:
    result = search(http, collection=cities, query="capital of Germany", mode=mode, top_k=3, rerank=True)
    assert len(result["hits"]) == 3
    expected_stages = {"dense", "rerank"} if mode == "dense" else {"fused", "rerank"}
    assert all(expected_stages <= set(hit["scores"]) for hit in result["hits"])
    scores = [hit["score"] for hit in result["hits"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == result["hits"][0]["scores"]["rerank"]
    assert {"embed", "search", "rerank", "total"} <= set(result["timings_ms"])
    assert result["degraded"] == []


def test_filters_apply_before_the_top_k_cut(http: httpx2.Client, cities: str) -> None:
    newer = {"field": "year", "op": "gte", "value": 2021}
    hits = search(http, collection=cities, query="capital", mode="dense", top_k=10, filters=newer)["hits"]
    assert sorted(h["doc_id"] for h in hits) == ["berlin", "tea"]
    either = {"or": [{"field": "tags", "op": "in", "value": ["spain"]}, {"field": "lang", "op": "eq", "value": "xx"}]}
    hits = search(http, collection=cities, query="capital", mode="hybrid", top_k=1, filters=either)["hits"]
    assert [h["doc_id"] for h in hits] == ["madrid"]


def test_upsert_replaces_and_delete_removes(http: httpx2.Client) -> None:
    assert http.post("/v1/collections", json={"name": "edits"}).status_code == 201
    first = {"id": "d", "text": "The original wording mentions zeppelins.", "metadata": {"v": 1}}
    http.post("/v1/collections/edits/documents", json={"documents": [first]})
    second = {"id": "d", "text": "The new wording mentions submarines.", "metadata": {"v": 2}}
    http.post("/v1/collections/edits/documents", json={"documents": [second]})
    doc = http.get("/v1/collections/edits/documents/d").json()
    assert (doc["text"], doc["metadata"], doc["chunks"]) == (second["text"], {"v": 2}, 1)
    assert search(http, collection="edits", query="zeppelins", mode="sparse")["hits"] == []
    assert http.get("/v1/collections/edits").json()["chunks"] == 1
    assert http.delete("/v1/collections/edits/documents/d").status_code == 204
    assert http.get("/v1/collections/edits/documents/d").status_code == 404
    assert http.get("/v1/collections/edits").json()["documents"] == 0


def test_delete_by_filter(http: httpx2.Client) -> None:
    assert http.post("/v1/collections", json={"name": "purge"}).status_code == 201
    docs = [{"id": f"d{i}", "text": f"document number {i}", "metadata": {"keep": i % 2 == 0}} for i in range(6)]
    http.post("/v1/collections/purge/documents", json={"documents": docs})
    deleted = http.post(
        "/v1/collections/purge/documents:delete", json={"filters": {"field": "keep", "op": "eq", "value": False}}
    )
    assert deleted.json()["deleted"] == 3 and deleted.json()["revision"] >= 2
    hits = search(http, collection="purge", query="document number", mode="sparse", top_k=10)["hits"]
    assert sorted(h["doc_id"] for h in hits) == ["d0", "d2", "d4"]


def test_a_large_upsert_runs_as_a_job(http: httpx2.Client) -> None:
    assert http.post("/v1/collections", json={"name": "bulk"}).status_code == 201
    docs = [{"id": f"b{i}", "text": f"bulk document {i} about topic {i % 7}"} for i in range(40)]
    accepted = http.post("/v1/collections/bulk/documents", json={"documents": docs})
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert (job["status"], job["total"], job["done"], job["failed"]) == ("succeeded", 40, 40, 0)
    assert http.get("/v1/collections/bulk").json()["documents"] == 40


def test_bad_input_gets_4xx_over_http_and_the_matching_code_over_grpc(
    http: httpx2.Client, stub: pb_grpc.TritonRagStub, cities: str
) -> None:
    missing = http.post("/v1/search", json={"collection": "nope", "query": "x"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    empty = http.post("/v1/search", json={"collection": cities, "query": "   "})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "query"
    too_many = http.post("/v1/search", json={"collection": cities, "query": "x", "top_k": 1000})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "top_k"
    bad_filter = http.post(
        "/v1/search", json={"collection": cities, "query": "x", "filters": {"field": "y", "op": "gt", "value": "a"}}
    )
    assert bad_filter.status_code == 422 and "takes a number" in bad_filter.json()["error"]["message"]
    huge = http.post(f"/v1/collections/{cities}/documents", json={"documents": [{"id": "h", "text": "x" * 70000}]})
    assert huge.status_code == 413

    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(pb.SearchRequest(collection="nope", query="x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(pb.SearchRequest(collection=cities, query="  "))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in str(caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpsertDocuments(
            pb.UpsertDocumentsRequest(collection=cities, documents=[pb.DocumentIn(id="h", text="x" * 70000)])
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert http.get("/v1/collections/cities").json()["documents"] == 4  # nothing of the refused requests landed


def test_grpc_search_equals_http_search(http: httpx2.Client, stub: pb_grpc.TritonRagStub, cities: str) -> None:
    filters = struct_pb2.Struct()
    filters.update({"field": "lang", "op": "eq", "value": "en"})
    reply = stub.Search(
        pb.SearchRequest(collection=cities, query="capital city", mode="hybrid", top_k=3, filters=filters)
    )
    over_http = search(
        http,
        collection=cities,
        query="capital city",
        mode="hybrid",
        top_k=3,
        filters={"field": "lang", "op": "eq", "value": "en"},
    )
    assert [h.doc_id for h in reply.hits] == [h["doc_id"] for h in over_http["hits"]]
    assert [round(h.score, 6) for h in reply.hits] == [round(h["score"], 6) for h in over_http["hits"]]


def test_kill_9_during_ingest_keeps_everything_acknowledged(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path
) -> None:
    env = orchestrator_env(tiny_triton, tiny_repository, tmp_path / "data")
    server = start_orchestrator(env)
    acknowledged: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        with httpx2.Client(base_url=server.http_url, timeout=30, headers=ADMIN_HEADERS) as client:
            client.post("/v1/collections", json={"name": "crash"})
            for i in range(10_000):
                if stop.is_set():
                    return
                doc = {"id": f"doc-{i}", "text": f"Acknowledged document {i}. " * (1 + i % 5)}
                try:
                    response = client.post("/v1/collections/crash/documents", json={"documents": [doc]})
                except httpx2.TransportError:
                    return
                if response.status_code == 200:
                    acknowledged.append(doc["id"])

    writer = threading.Thread(target=ingest)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    stop.set()
    writer.join()
    assert len(acknowledged) >= 25

    restarted = start_orchestrator(env)
    try:
        with httpx2.Client(base_url=restarted.http_url, timeout=30, headers=ADMIN_HEADERS) as client:
            info = client.get("/v1/collections/crash").json()
            # Everything acknowledged is there; at most the one request in flight at the kill may be too.
            assert info["documents"] in (len(acknowledged), len(acknowledged) + 1)
            for doc_id in acknowledged:
                doc = client.get(f"/v1/collections/crash/documents/{doc_id}").json()
                i = int(doc_id.split("-")[1])
                assert doc["text"] == f"Acknowledged document {i}. " * (1 + i % 5)
            last = acknowledged[-1]
            hits = search(
                client, collection="crash", query=f"Acknowledged document {last.split('-')[1]}", mode="sparse", top_k=50
            )
            assert last in {h["doc_id"] for h in hits["hits"]}
            # Each of these short documents is one chunk: a half-written document would break the equality.
            assert info["chunks"] == info["documents"]
    finally:
        stop_orchestrator(restarted)


def test_ingest_cli_shows_progress_and_resumes(orchestrator: Orchestrator, http: httpx2.Client, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Owls hunt at night and see well in the dark.")
    (corpus / "b.md").write_text("# Foxes\n\nFoxes are small omnivores of the dog family.")
    (corpus / "c.jsonl").write_text(
        "\n".join(json.dumps({"id": f"line-{i}", "text": f"Line record {i} about rivers."}) for i in range(5))
    )
    (corpus / "broken.json").write_text("{not json")
    env = {**os.environ, "TRITONRAG_WORK_DIR": str(tmp_path / "work")}
    command = [
        sys.executable,
        "-m",
        "tritonrag.deploy.cli",
        "ingest",
        str(corpus),
        "--collection",
        "files",
        "--url",
        orchestrator.http_url,
        "--batch",
        "2",
    ]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert "7/7 documents" in first.stderr and "chunks/s" in first.stderr and "ETA" in first.stderr
    assert "skipped" in first.stderr and "broken.json" in first.stderr
    assert "ingested 7 documents" in first.stdout
    assert http.get("/v1/collections/files").json()["documents"] == 7

    (corpus / "a.txt").write_text("Owls hunt at night; their hearing is extraordinary.")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert "ingested 1 documents" in second.stdout and "6 already there" in second.stdout
    hits = search(http, collection="files", query="owls hearing", mode="sparse", top_k=1)["hits"]
    assert "extraordinary" in hits[0]["text"]


def test_ingest_cli_lands_every_file_with_text_in_any_encoding(
    orchestrator: Orchestrator, http: httpx2.Client, tmp_path: Path
) -> None:
    files = mixed_corpus(tmp_path / "corpus", SMALL_MODULES * 2)  # 40 files with text, in ten encodings
    env = {**os.environ, "TRITONRAG_WORK_DIR": str(tmp_path / "work")}
    command = [sys.executable, "-m", "tritonrag.deploy.cli", "ingest", "corpus", "--collection", "mixed"]
    command += ["--url", orchestrator.http_url]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    assert http.get("/v1/collections/mixed").json()["documents"] == len(files) == 40
    assert "ingested 40 documents" in run.stdout and "0 failed, 0 already there, 2 files skipped" in run.stdout
    assert "40/40 documents" in run.stderr and "skipped 2 files:" in run.stderr
    assert "corpus/blank.md: has no text" in run.stderr and "corpus/image.txt: is not text" in run.stderr
    for path, odd in [(files[0], LATIN_1), (files[2], JAPANESE), (files[3], RUSSIAN), (files[4], RUSSIAN)]:
        doc_id = path.relative_to(tmp_path).as_posix()
        document = http.get(f"/v1/collections/mixed/documents/{quote(doc_id, safe='')}").json()
        assert odd in document["text"], doc_id


def test_metrics_show_the_running_stack(
    http: httpx2.Client, stub: pb_grpc.TritonRagStub, cities: str, tiny_triton: TritonServer
) -> None:
    search(http, collection=cities, query="capital of France", mode="hybrid", top_k=2)
    stub.Search(pb.SearchRequest(collection=cities, query="capital of France"))
    scraped = http.get("/metrics")
    assert scraped.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    endpoint = (("endpoint", tiny_triton.endpoints.grpc_url),)
    assert samples[("tritonrag_triton_endpoint_up", endpoint)] == 1
    assert samples[("tritonrag_triton_breaker_state", (*endpoint, ("state", "closed")))] == 1
    assert samples[("tritonrag_triton_model_version", (*endpoint, ("model", "embedder")))] == 1
    assert samples[("tritonrag_collection_documents", (("collection", f"default/{cities}"),))] >= 1  # its key
    http_search = (("method", "POST"), ("protocol", "http"), ("route", "/v1/search"), ("status", "200"))
    grpc_search = (
        ("method", "POST"),
        ("protocol", "grpc"),
        ("route", "/tritonrag.v1.TritonRag/Search"),
        ("status", "OK"),
    )
    assert samples[("tritonrag_requests_total", http_search)] >= 1
    assert samples[("tritonrag_requests_total", grpc_search)] >= 1
    assert samples[("tritonrag_stage_duration_seconds_count", (("stage", "embed"),))] >= 2
    assert samples[("tritonrag_inflight_limit", (("class", "search"),))] == 64
    assert ("tritonrag_ingest_documents_pending", ()) in samples

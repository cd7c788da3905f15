"""Metrics and access lines of both front-ends over the fakes: exact counts of a scripted workload, the JSON
access line, ``/metrics`` and its token, and the scrape-time collectors."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from logging.handlers import QueueListener
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from pydantic import SecretStr

from tests.fakes import FakeSearch, FakeServices, grpc_channel
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import CollectionCreate, JobStatus, SearchRequest, SearchResponse
from tritonrag.server.cache.scope import current_scope
from tritonrag.server.config import ApiSettings, IndexSettings, LogFormat, TelemetrySettings
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.routing.endpoints import EndpointStatus
from tritonrag.server.routing.resilience import BreakerState
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.telemetry.collectors import CollectionCollector, EndpointCollector, JobCollector
from tritonrag.server.telemetry.logs import configure_logging
from tritonrag.server.telemetry.timing import Timer

SEARCH = {"protocol": "http", "route": "/v1/search", "method": "POST"}
QUERY = {"protocol": "http", "route": "/v1/query", "method": "POST"}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class TimedSearch(FakeSearch):
    """``FakeSearch`` timing two stages with the real ``Timer``, its reranker down."""

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        timer = Timer()
        for stage in ("embed", "dense"):
            timer.stage(stage, time.perf_counter())
        found = await super().search(request, request_id)
        return found.model_copy(update={"timings_ms": timer.report(["rerank"]), "degraded": ["rerank"]})


@pytest.fixture
def fakes() -> FakeServices:
    fakes = FakeServices.create()
    search = TimedSearch(fakes.collections)
    return FakeServices(fakes.collections, search, fakes.answers, fakes.models, fakes.readiness)


@dataclass
class Logs:
    """What ``telemetry.log_format: json`` writes, kept here rather than on stderr."""

    stream: io.StringIO
    listener: QueueListener

    def access_lines(self) -> list[dict[str, Any]]:
        """The access lines written so far (the writer thread is stopped first, so all are)."""
        self.listener.stop()
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if '"tritonrag.access"' in line]


@pytest.fixture
def json_logs() -> Iterator[Logs]:
    """JSON logging as configured at start; the root logger restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    stream = io.StringIO()
    yield Logs(stream, configure_logging(TelemetrySettings(log_format=LogFormat.json), stream))
    root.handlers, root.level = handlers, level


def test_http_requests_stages_and_access_lines_are_counted_exactly(fakes: FakeServices, json_logs: Logs) -> None:
    names = [
        ("tritonrag_requests_total", {**SEARCH, "status": "200"}),
        ("tritonrag_request_duration_seconds_count", SEARCH),
        ("tritonrag_requests_total", {**QUERY, "status": "200"}),
        ("tritonrag_requests_total", {**QUERY, "status": "422"}),
        (
            "tritonrag_requests_total",
            {"protocol": "http", "route": "/v1/collections/{name}", "method": "GET", "status": "404"},
        ),
        ("tritonrag_requests_total", {"protocol": "http", "route": "unmatched", "method": "GET", "status": "404"}),
        (
            "tritonrag_requests_total",
            {
                "protocol": "http",
                "route": "/v1/collections/{name}/documents/{doc_id}",
                "method": "GET",
                "status": "404",
            },
        ),
        ("tritonrag_stage_duration_seconds_count", {"stage": "embed"}),
        ("tritonrag_stage_duration_seconds_count", {"stage": "dense"}),
        ("tritonrag_degraded_requests_total", {"stage": "rerank"}),
    ]
    before = [sample(name, **labels) for name, labels in names]
    with TestClient(fakes.http_app(ApiSettings())) as client:
        client.post("/v1/collections", json={"name": "docs"})
        client.post("/v1/collections/docs/documents", json={"documents": [{"id": "a", "text": "alpha"}]})
        for n in range(3):
            assert (
                client.post(
                    "/v1/search", json={"collection": "docs", "query": "q"}, headers={"x-request-id": f"s-{n}"}
                ).status_code
                == 200
            )
        assert client.get("/v1/collections/nope").status_code == 404
        assert client.get("/nope/at/all").status_code == 404
        assert client.get("/v1/collections/docs/documents/x/y").status_code == 404
        assert client.post("/v1/query", json={"collection": "docs", "query": "q"}).status_code == 200
        assert client.post("/v1/query", json={"collection": "docs", "query": "q", "stream": True}).status_code == 200
        assert client.post("/v1/query", json={"collection": "docs"}).status_code == 422
    deltas = [sample(name, **labels) - b for (name, labels), b in zip(names, before, strict=True)]
    assert deltas == [3, 3, 2, 1, 1, 1, 1, 3, 3, 3]

    lines = json_logs.access_lines()
    searches = [line for line in lines if line["route"] == "/v1/search"]
    assert [line["request_id"] for line in searches] == ["s-0", "s-1", "s-2"]
    first = searches[0]
    assert {"time", "level", "logger", "message", "protocol", "method", "status", "latency_ms", "cache"} <= set(first)
    assert (first["level"], first["message"], first["status"], first["degraded"]) == (
        "INFO",
        "POST /v1/search 200",
        "200",
        ["rerank"],
    )
    assert set(first["stages_ms"]) == {"embed", "dense"} and first["latency_ms"] > 0
    assert len(lines) == 11  # one per request: 2 writes, 3 searches, 3 not found, 3 queries


def test_the_cache_level_a_handler_leaves_reaches_the_access_line(fakes: FakeServices, json_logs: Logs) -> None:
    app = fakes.http_app(ApiSettings())

    @app.get("/cached")
    async def cached(request: Request) -> dict[str, str]:
        request.state.cache = "l1"
        return {}

    with TestClient(app) as client:
        client.get("/cached")
    (line,) = json_logs.access_lines()
    assert line["cache"] == "l1"


def test_metrics_off_counts_nothing(fakes: FakeServices) -> None:
    before = sample("tritonrag_requests_total", **SEARCH, status="200")
    app = fakes.http_app(ApiSettings(), telemetry=TelemetrySettings(metrics=False, access_log=False))
    with TestClient(app) as client:
        client.post("/v1/collections", json={"name": "docs"})
        assert client.post("/v1/search", json={"collection": "docs", "query": "q"}).status_code == 200
        assert client.get("/metrics").status_code == 404
    assert sample("tritonrag_requests_total", **SEARCH, status="200") == before


def test_metrics_endpoint_and_its_bearer_token(fakes: FakeServices) -> None:
    with TestClient(fakes.http_app(ApiSettings())) as client:
        client.post("/v1/collections", json={"name": "docs"})
        scraped = client.get("/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert (
            'tritonrag_requests_total{method="POST",protocol="http",route="/v1/collections",status="201"}'
            in scraped.text
        )
        assert "_created" not in scraped.text

    telemetry = TelemetrySettings(metrics_token=SecretStr("s3cret"))
    with TestClient(fakes.http_app(ApiSettings(), telemetry=telemetry)) as client:
        refused = client.get("/metrics", headers={"authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED"
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"authorization": "Bearer s3cret"}).status_code == 200

    with TestClient(fakes.http_app(ApiSettings(), telemetry=TelemetrySettings(metrics_port=9999))) as client:
        assert client.get("/metrics").status_code == 404  # served on its own port instead (app.serve)


@pytest.fixture
async def stub(fakes: FakeServices) -> AsyncIterator[pb_grpc.TritonRagAsyncStub]:
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers) as channel:
        yield pb_grpc.TritonRagStub(channel)


@pytest.mark.anyio
async def test_grpc_calls_are_counted_by_method_and_code(fakes: FakeServices, stub: pb_grpc.TritonRagAsyncStub) -> None:
    route = "/tritonrag.v1.TritonRag/"
    search = {"protocol": "grpc", "route": route + "Search", "method": "POST", "status": "OK"}
    missing = {"protocol": "grpc", "route": route + "GetCollection", "method": "POST", "status": "NOT_FOUND"}
    stages = {"stage": "embed"}
    before = [
        sample("tritonrag_requests_total", **search),
        sample("tritonrag_requests_total", **missing),
        sample("tritonrag_stage_duration_seconds_count", **stages),
    ]
    await fakes.collections.create_collection(CollectionCreate(name="docs"))
    for _ in range(2):
        await stub.Search(pb.SearchRequest(collection="docs", query="q"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetCollection(pb.GetCollectionRequest(name="nope"))
    after = [
        sample("tritonrag_requests_total", **search),
        sample("tritonrag_requests_total", **missing),
        sample("tritonrag_stage_duration_seconds_count", **stages),
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 2]


class ScopedSearch(FakeSearch):
    """``FakeSearch`` that sees the call's cache scope: it records whether the scope bypasses the cache, and
    reports that L2 served the result unless it does."""

    def __init__(self, fakes: FakeServices) -> None:
        super().__init__(fakes.collections)
        self.bypassed: list[bool] = []

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        scope = current_scope()
        self.bypassed.append(scope.bypass)
        scope.report("miss" if scope.bypass else "l2")
        return await super().search(request, request_id)


@pytest.mark.anyio
async def test_a_grpc_call_has_a_cache_scope_whose_level_reaches_the_access_line(
    fakes: FakeServices, json_logs: Logs
) -> None:
    search = ScopedSearch(fakes)
    await fakes.collections.create_collection(CollectionCreate(name="docs"))
    async with grpc_channel(fakes.collections, search, fakes.answers) as channel:
        stub = pb_grpc.TritonRagStub(channel)
        await stub.Search(pb.SearchRequest(collection="docs", query="q"))
        await stub.Search(pb.SearchRequest(collection="docs", query="q"), metadata=(("cache-control", "no-cache"),))
    assert search.bypassed == [False, True]
    assert [line["cache"] for line in json_logs.access_lines()] == ["l2", "miss"]


async def _dimension() -> int:
    return 4


@pytest.mark.anyio
async def test_collectors_read_endpoints_collections_and_jobs_at_scrape_time(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    registry = CollectionRegistry(tmp_path, catalog, IndexSettings(), _dimension)
    await registry.create(CollectionCreate(name="docs"))
    for total, done, failed, status in (
        (10, 10, 0, JobStatus.succeeded),
        (5, 2, 1, JobStatus.running),
        (4, 0, 0, JobStatus.queued),
    ):
        job = catalog.create_job("docs", total)
        catalog.update_job(job.info.id, status=status, done=done, failed=failed)
    endpoints = [
        EndpointStatus("a:1", True, BreakerState.closed, 2, {"generator": "3"}, 0),
        EndpointStatus("b:1", False, BreakerState.open, 0, {}, 4),
    ]
    collected = {
        (sample_.name, tuple(sorted(sample_.labels.items()))): sample_.value
        for collector in (EndpointCollector(lambda: endpoints), CollectionCollector(registry), JobCollector(catalog))
        for family in collector.collect()
        for sample_ in family.samples
    }
    assert collected[("tritonrag_triton_endpoint_up", (("endpoint", "b:1"),))] == 0
    assert collected[("tritonrag_triton_breaker_state", (("endpoint", "b:1"), ("state", "open")))] == 1
    assert collected[("tritonrag_triton_breaker_state", (("endpoint", "b:1"), ("state", "closed")))] == 0
    assert collected[("tritonrag_triton_breaker_openings_total", (("endpoint", "b:1"),))] == 4
    assert collected[("tritonrag_triton_outstanding_requests", (("endpoint", "a:1"),))] == 2
    assert collected[("tritonrag_triton_model_version", (("endpoint", "a:1"), ("model", "generator")))] == 3
    assert collected[("tritonrag_collection_documents", (("collection", "docs"),))] == 0
    assert collected[("tritonrag_ingest_jobs", (("status", "running"),))] == 1
    assert collected[("tritonrag_ingest_jobs", (("status", "failed"),))] == 0
    assert collected[("tritonrag_ingest_documents_total", (("outcome", "done"),))] == 12
    assert collected[("tritonrag_ingest_documents_total", (("outcome", "failed"),))] == 1
    assert collected[("tritonrag_ingest_documents_pending", ())] == 2 + 4
    await registry.close()
    catalog.close()


def test_the_exposition_has_no_created_series() -> None:
    assert b"_created" not in generate_latest(REGISTRY)

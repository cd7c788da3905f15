"""The gRPC front-end over an in-memory core, on a real channel: RPCs, status codes, health, reflection."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fake_core import FakeCore
from tritonrag.clients.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.server.api.grpc_service import SERVICE_NAME, create_grpc_server
from tritonrag.server.api.http import create_http_app
from tritonrag.server.config import ApiSettings
from tritonrag.server.schema import Mmr, SearchMode, SearchRequest

pytestmark = pytest.mark.anyio

LIMIT = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


@pytest.fixture
def core() -> FakeCore:
    return FakeCore(inline_max_documents=2)


@pytest.fixture
def settings() -> ApiSettings:
    return ApiSettings(grpc_port=free_port(), max_request_bytes=LIMIT)


@pytest.fixture
async def channel(core: FakeCore, settings: ApiSettings) -> AsyncIterator[grpc.aio.Channel]:
    server = create_grpc_server(core, settings)
    await server.start()
    async with grpc.aio.insecure_channel(f"{settings.host}:{settings.grpc_port}") as client_channel:
        yield client_channel
    await server.stop(grace=None)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.TritonRagAsyncStub:
    return pb_grpc.TritonRagStub(channel)


async def failure(call: Awaitable[Message]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_collection_lifecycle(stub: pb_grpc.TritonRagAsyncStub) -> None:
    created = await stub.CreateCollection(
        pb.CreateCollectionRequest(name="news", chunking=pb.Chunking(chunk_tokens=128))
    )
    assert (created.name, created.chunking.chunk_tokens, created.chunking.overlap_tokens) == ("news", 128, 40)
    assert (created.index_type, created.embedder.version) == ("auto", "1")

    duplicate = await failure(stub.CreateCollection(pb.CreateCollectionRequest(name="news")))
    assert duplicate == (grpc.StatusCode.ALREADY_EXISTS, "collection 'news' exists")

    listed = await stub.ListCollections(pb.ListCollectionsRequest())
    assert [info.name for info in listed.collections] == ["news"]
    assert (await stub.GetCollection(pb.GetCollectionRequest(name="news"))).documents == 0
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="news"))
    code, _ = await failure(stub.GetCollection(pb.GetCollectionRequest(name="news")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_documents_inline_and_as_a_job(stub: pb_grpc.TritonRagAsyncStub, core: FakeCore) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(name="news"))
    metadata = {"year": 2020, "score": 0.5, "tags": ["a", "b"], "draft": False}
    upserted = await stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="news",
            documents=[pb.DocumentIn(id="a", text="first", metadata=struct(metadata)), pb.DocumentIn(id="b", text="b")],
        )
    )
    assert (upserted.documents, upserted.chunks, upserted.HasField("job_id")) == (2, 2, False)
    stored = core.documents["news"]["a"].metadata
    assert stored == metadata and isinstance(stored["year"], int)  # whole Struct numbers arrive as ints
    assert core.documents["news"]["b"].metadata == {}

    document = await stub.GetDocument(pb.GetDocumentRequest(collection="news", doc_id="a"))
    assert (document.text, json_format.MessageToDict(document.metadata)) == ("first", metadata)
    await stub.DeleteDocument(pb.DeleteDocumentRequest(collection="news", doc_id="a"))
    code, _ = await failure(stub.GetDocument(pb.GetDocumentRequest(collection="news", doc_id="a")))
    assert code == grpc.StatusCode.NOT_FOUND

    documents = [pb.DocumentIn(id=doc_id, text="t") for doc_id in "cde"]
    job = await stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="news", documents=documents))
    assert job.HasField("job_id")
    info = await stub.GetJob(pb.GetJobRequest(id=job.job_id))
    assert (info.status, info.total, info.collection) == ("queued", 3, "news")
    code, _ = await failure(stub.GetJob(pb.GetJobRequest(id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_delete_by_filter_and_search(stub: pb_grpc.TritonRagAsyncStub, core: FakeCore) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(name="news"))
    documents = [
        pb.DocumentIn(id=i, text=f"text {i}", metadata=struct({"lang": lang})) for i, lang in (("a", "en"), ("b", "fr"))
    ]
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="news", documents=documents))

    found = await stub.Search(pb.SearchRequest(collection="news", query="text"))
    assert core.searches[-1] == SearchRequest(collection="news", query="text")  # unset fields take the defaults
    assert [hit.doc_id for hit in found.hits] == ["a", "b"]
    assert (dict(found.hits[0].scores), dict(found.timings_ms)) == ({"dense": 0.5, "sparse": 2.0}, {"total": 1.5})

    filters = {"or": [{"field": "lang", "op": "eq", "value": "fr"}, {"field": "lang", "op": "in", "value": ["de"]}]}
    request = pb.SearchRequest(
        collection="news", query="text", top_k=1, mode="dense", filters=struct(filters), mmr=pb.Mmr(**{"lambda": 0.25})
    )
    found = await stub.Search(request)
    assert [hit.doc_id for hit in found.hits] == ["b"]
    assert core.searches[-1] == SearchRequest.model_validate(
        {
            "collection": "news",
            "query": "text",
            "top_k": 1,
            "mode": "dense",
            "filters": filters,
            "mmr": {"lambda": 0.25},
        }
    )
    assert (core.searches[-1].mode, core.searches[-1].mmr) == (SearchMode.dense, Mmr(**{"lambda": 0.25}))

    deleted = await stub.DeleteByFilter(
        pb.DeleteByFilterRequest(collection="news", filters=struct({"field": "lang", "op": "eq", "value": "en"}))
    )
    assert deleted.deleted == 1
    assert list(core.documents["news"]) == ["b"]


BAD_REQUESTS: list[tuple[str, dict[str, Any], str, Message]] = [
    ("/v1/collections", {"name": "bad name"}, "CreateCollection", pb.CreateCollectionRequest(name="bad name")),
    (
        "/v1/collections/news/documents",
        {"documents": [{"id": "a", "text": "  "}]},
        "UpsertDocuments",
        pb.UpsertDocumentsRequest(collection="news", documents=[pb.DocumentIn(id="a", text="  ")]),
    ),
    (
        "/v1/collections/news/documents",
        {"documents": []},
        "UpsertDocuments",
        pb.UpsertDocumentsRequest(collection="news"),
    ),
    (
        "/v1/search",
        {"collection": "news", "query": "q", "top_k": 0},
        "Search",
        pb.SearchRequest(collection="news", query="q", top_k=0),
    ),
    (
        "/v1/search",
        {"collection": "news", "query": "q", "filters": {"field": "year", "op": "gt", "value": "x"}},
        "Search",
        pb.SearchRequest(collection="news", query="q", filters=struct({"field": "year", "op": "gt", "value": "x"})),
    ),
    (
        "/v1/collections/news/documents:delete",
        {"filters": {"and": []}},
        "DeleteByFilter",
        pb.DeleteByFilterRequest(collection="news", filters=struct({"and": []})),
    ),
]


@pytest.mark.parametrize(("path", "body", "method", "request_message"), BAD_REQUESTS)
async def test_a_bad_request_gets_the_same_message_over_http_and_grpc(
    stub: pb_grpc.TritonRagAsyncStub,
    core: FakeCore,
    settings: ApiSettings,
    path: str,
    body: dict[str, Any],
    method: str,
    request_message: Message,
) -> None:
    with TestClient(create_http_app(core, settings)) as client:
        over_http = client.post(path, json=body)
    assert over_http.status_code == 422
    error = over_http.json()["error"]
    assert error["field"] and error["message"].startswith(f"{error['field']}: ")

    code, details = await failure(getattr(stub, method)(request_message))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, error["message"])


async def test_a_message_over_the_limit_is_resource_exhausted(stub: pb_grpc.TritonRagAsyncStub) -> None:
    code, _ = await failure(stub.Search(pb.SearchRequest(collection="news", query="q" * LIMIT)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_bug_is_internal_without_details(
    stub: pb_grpc.TritonRagAsyncStub, core: FakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: SearchRequest) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(core, "search", broken)
    assert await failure(stub.Search(pb.SearchRequest(collection="news", query="q"))) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
    )


async def test_health_answers_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    questions = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, described = [answer async for answer in stub.ServerReflectionInfo(iter(questions))]
    names = {service.name for service in listed.list_services_response.service}
    assert names >= {"tritonrag.v1.TritonRag", "grpc.health.v1.Health"}
    assert described.file_descriptor_response.file_descriptor_proto  # the descriptor of tritonrag/v1/tritonrag.proto

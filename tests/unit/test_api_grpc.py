"""The gRPC front-end over in-memory services, on a real channel: RPCs, status codes, health, reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import BaseModel

from tests.fakes import FakeAnswers, FakeCollections, FakeSearch, FakeServices, grpc_channel, sse_events
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import (
    DeltaEvent,
    DoneEvent,
    Fusion,
    Mmr,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchMode,
    SearchRequest,
    SourcesEvent,
    VerbatimWeights,
)
from tritonrag.deploy.launcher import free_port
from tritonrag.server.api.grpc_service import SERVICE_NAME
from tritonrag.server.config import ApiSettings
from tritonrag.server.errors import ResourceExhaustedError, UnavailableError

pytestmark = pytest.mark.anyio

LIMIT = 4096


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


@pytest.fixture
def settings() -> ApiSettings:
    return ApiSettings(grpc_port=free_port(), max_request_bytes=LIMIT)


@pytest.fixture
async def channel(fakes: FakeServices, settings: ApiSettings) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers, settings) as client_channel:
        yield client_channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.TritonRagAsyncStub:
    return pb_grpc.TritonRagStub(channel)


_Model = TypeVar("_Model", bound=BaseModel)


async def failure(call: Awaitable[Message] | grpc.aio.UnaryStreamCall[Any, Any]) -> tuple[grpc.StatusCode, str]:
    """The status of a call that fails; a streaming call is read to its end."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            _ = [message async for message in call]
        else:
            await call
    return caught.value.code(), caught.value.details() or ""


def model_of(model: type[_Model], message: Message) -> _Model:
    """A reply read back into the model the HTTP API answers with."""
    return model.model_validate(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def event_of(message: pb.QueryEvent) -> QueryEvent:
    kind = message.WhichOneof("event")
    assert kind is not None
    events: dict[str, type[QueryEvent]] = {"sources": SourcesEvent, "delta": DeltaEvent, "done": DoneEvent}
    return model_of(events[kind], getattr(message, kind))


async def test_collection_lifecycle(stub: pb_grpc.TritonRagAsyncStub) -> None:
    created = await stub.CreateCollection(
        pb.CreateCollectionRequest(
            name="news",
            chunking=pb.Chunking(chunk_tokens=128, header=pb.ChunkHeader(metadata_field="", first_line=False)),
        )
    )
    assert (created.name, created.chunking.chunk_tokens, created.chunking.overlap_tokens) == ("news", 128, 40)
    header = created.chunking.header
    assert (header.metadata_field, header.first_line, header.max_tokens) == ("", False, 32)
    assert (created.index_type, created.language, created.embedder.version) == ("auto", "english", "1")
    german = await stub.CreateCollection(pb.CreateCollectionRequest(name="nachrichten", language="german"))
    assert german.language == "german"
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="nachrichten"))

    duplicate = await failure(stub.CreateCollection(pb.CreateCollectionRequest(name="news")))
    assert duplicate == (grpc.StatusCode.ALREADY_EXISTS, "collection 'news' exists")

    listed = await stub.ListCollections(pb.ListCollectionsRequest())
    assert [info.name for info in listed.collections] == ["news"]
    assert (await stub.GetCollection(pb.GetCollectionRequest(name="news"))).documents == 0
    await stub.DeleteCollection(pb.DeleteCollectionRequest(name="news"))
    code, _ = await failure(stub.GetCollection(pb.GetCollectionRequest(name="news")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_documents_inline_and_as_a_job(stub: pb_grpc.TritonRagAsyncStub, collections: FakeCollections) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(name="news"))
    metadata = {"year": 2020, "score": 0.5, "tags": ["a", "b"], "draft": False}
    upserted = await stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            collection="news",
            documents=[pb.DocumentIn(id="a", text="first", metadata=struct(metadata)), pb.DocumentIn(id="b", text="b")],
        )
    )
    assert (upserted.documents, upserted.chunks, upserted.HasField("job_id")) == (2, 2, False)
    stored = collections.documents["news"]["a"].metadata
    assert stored == metadata and isinstance(stored["year"], int)  # whole Struct numbers arrive as ints
    assert collections.documents["news"]["b"].metadata == {}

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


async def test_delete_by_filter_and_search(
    stub: pb_grpc.TritonRagAsyncStub, collections: FakeCollections, search: FakeSearch
) -> None:
    await stub.CreateCollection(pb.CreateCollectionRequest(name="news"))
    documents = [
        pb.DocumentIn(id=i, text=f"text {i}", metadata=struct({"lang": lang})) for i, lang in (("a", "en"), ("b", "fr"))
    ]
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="news", documents=documents))

    found = await stub.Search(pb.SearchRequest(collection="news", query="text"))
    assert search.searches[-1] == SearchRequest(collection="news", query="text")  # unset fields take the defaults
    assert [hit.doc_id for hit in found.hits] == ["a", "b"]
    assert (dict(found.hits[0].scores), dict(found.timings_ms)) == ({"dense": 0.5, "sparse": 2.0}, {"total": 1.5})

    filters = {"or": [{"field": "lang", "op": "eq", "value": "fr"}, {"field": "lang", "op": "in", "value": ["de"]}]}
    request = pb.SearchRequest(
        collection="news",
        query="text",
        top_k=1,
        mode="dense",
        filters=struct(filters),
        mmr=pb.Mmr(**{"lambda": 0.25}),
        min_revision=2,
    )
    found = await stub.Search(request)
    assert [hit.doc_id for hit in found.hits] == ["b"]
    assert search.searches[-1] == SearchRequest.model_validate(
        {
            "collection": "news",
            "query": "text",
            "top_k": 1,
            "mode": "dense",
            "filters": filters,
            "mmr": {"lambda": 0.25},
            "min_revision": 2,  # an int64, a string in the message's JSON form
        }
    )
    assert (search.searches[-1].mode, search.searches[-1].mmr) == (SearchMode.dense, Mmr(**{"lambda": 0.25}))

    for fusion, expected in (
        (
            pb.Fusion(dense=1, verbatim=pb.VerbatimWeights(dense=0, sparse=1)),
            {"dense": 1, "verbatim": {"dense": 0, "sparse": 1}},
        ),
        (pb.Fusion(method="rrf"), {"method": "rrf"}),  # the default weights, the verbatim ones included
        (pb.Fusion(sparse=0.5), {"sparse": 0.5}),  # a weight set, no verbatim: those weights throughout
    ):
        await stub.Search(pb.SearchRequest(collection="news", query="text", fusion=fusion))
        assert search.searches[-1].fusion == Fusion.model_validate(expected)
    own, default, throughout = (request.fusion for request in search.searches[-3:])
    assert own.verbatim == VerbatimWeights(dense=0, sparse=1, document=0.4)  # unset: the verbatim default
    assert (default.verbatim, default.dense, throughout.verbatim) == (VerbatimWeights(), 0.7, None)

    deleted = await stub.DeleteByFilter(
        pb.DeleteByFilterRequest(collection="news", filters=struct({"field": "lang", "op": "eq", "value": "en"}))
    )
    assert deleted.deleted == 1 and not deleted.HasField("revision")  # the stand-in service tells no revision
    assert list(collections.documents["news"]) == ["b"]


BAD_REQUESTS: list[tuple[str, dict[str, Any], str, Message]] = [
    ("/v1/collections", {"name": "bad name"}, "CreateCollection", pb.CreateCollectionRequest(name="bad name")),
    (
        "/v1/collections",
        {"name": "news", "language": "klingon"},
        "CreateCollection",
        pb.CreateCollectionRequest(name="news", language="klingon"),
    ),
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
        "/v1/search",
        {"collection": "news", "query": "q", "fusion": {"verbatim": {"dense": 0, "sparse": 0, "document": 0}}},
        "Search",
        pb.SearchRequest(
            collection="news", query="q", fusion=pb.Fusion(verbatim=pb.VerbatimWeights(dense=0, sparse=0, document=0))
        ),
    ),
    (
        "/v1/collections/news/documents:delete",
        {"filters": {"and": []}},
        "DeleteByFilter",
        pb.DeleteByFilterRequest(collection="news", filters=struct({"and": []})),
    ),
    (
        "/v1/query",
        {"collection": "news", "query": "q", "sampling": {"temperature": 3, "seed": -1}},
        "Query",
        pb.QueryRequest(collection="news", query="q", sampling=pb.SamplingParams(temperature=3, seed=-1)),
    ),
    (
        "/v1/query",
        {"collection": "news", "query": " ", "stream": True, "top_k": 51, "sampling": {"stop": [""]}},
        "QueryStream",
        pb.QueryRequest(collection="news", query=" ", top_k=51, sampling=pb.SamplingParams(stop=[""])),
    ),
]


@pytest.mark.parametrize(("path", "body", "method", "request_message"), BAD_REQUESTS)
async def test_a_bad_request_gets_the_same_message_over_http_and_grpc(
    stub: pb_grpc.TritonRagAsyncStub,
    fakes: FakeServices,
    answers: FakeAnswers,
    settings: ApiSettings,
    path: str,
    body: dict[str, Any],
    method: str,
    request_message: Message,
) -> None:
    with TestClient(fakes.http_app(settings)) as client:
        over_http = client.post(path, json=body)
    assert over_http.status_code == 422
    error = over_http.json()["error"]
    assert error["field"] and error["message"].startswith(f"{error['field']}: ")

    code, details = await failure(getattr(stub, method)(request_message))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, error["message"])
    assert not answers.queries


async def test_a_message_over_the_limit_is_resource_exhausted(stub: pb_grpc.TritonRagAsyncStub) -> None:
    code, _ = await failure(stub.Search(pb.SearchRequest(collection="news", query="q" * LIMIT)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_bug_is_internal_without_details(
    stub: pb_grpc.TritonRagAsyncStub, search: FakeSearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: SearchRequest, request_id: str | None = None) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(search, "search", broken)
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


# Query and QueryStream


@pytest.fixture
async def news(stub: pb_grpc.TritonRagAsyncStub) -> pb_grpc.TritonRagAsyncStub:
    """``stub`` with a collection "news" of documents a (lang en, year 2020) and b (lang fr)."""
    await stub.CreateCollection(pb.CreateCollectionRequest(name="news"))
    documents = [
        pb.DocumentIn(id="a", text="text of a", metadata=struct({"lang": "en", "year": 2020})),
        pb.DocumentIn(id="b", text="text of b", metadata=struct({"lang": "fr"})),
    ]
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="news", documents=documents))
    return stub


async def test_query_and_query_stream_answer_as_over_http(
    news: pb_grpc.TritonRagAsyncStub, fakes: FakeServices, answers: FakeAnswers, settings: ApiSettings
) -> None:
    answers.degraded, answers.dropped_passages = ["embed"], 3
    filters = {"field": "lang", "op": "in", "value": ["en", "de"]}
    body = {
        "collection": "news",
        "query": "what is new?",
        "top_k": 4,
        "mode": "sparse",
        "filters": filters,
        "rerank": True,
        "sampling": {"max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "seed": 2**40, "stop": ["\n"]},
    }
    message = pb.QueryRequest(
        collection="news",
        query="what is new?",
        top_k=4,
        mode="sparse",
        filters=struct(filters),
        rerank=True,
        sampling=pb.SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, seed=2**40, stop=["\n"]),
    )
    with TestClient(fakes.http_app(settings)) as client:
        over_http = QueryResponse.model_validate(client.post("/v1/query", json=body).json())
        http_request = answers.queries[-1]
        events_over_http = [data for _, data in sse_events(client.post("/v1/query", json=body | {"stream": True}))]
        http_stream_request = answers.queries[-1]

    answer = await news.Query(message, metadata=(("x-request-id", "req-1"),))
    assert answers.queries[-1] == http_request == QueryRequest.model_validate(body)
    assert answers.request_ids[-1] == "req-1"
    assert model_of(QueryResponse, answer) == over_http
    assert over_http.sources[0].metadata == {"lang": "en", "year": 2020}
    assert (over_http.dropped_passages, over_http.degraded, over_http.finish_reason) == (3, ["embed"], "length")

    call = news.QueryStream(message)
    events = [event_of(event) async for event in call]
    assert answers.queries[-1] == http_stream_request == QueryRequest.model_validate(body | {"stream": True})
    assert [event.model_dump(mode="json") for event in events] == events_over_http
    assert [type(event) for event in events] == [SourcesEvent] + [DeltaEvent] * 4 + [DoneEvent]
    assert dict(await call.initial_metadata())["x-request-id"] == answers.request_ids[-1]  # made up, sent back
    assert answers.streams_closed == [True, True, True, True]


async def test_search_takes_the_request_id_and_sends_it_back(
    news: pb_grpc.TritonRagAsyncStub, search: FakeSearch
) -> None:
    call = news.Search(pb.SearchRequest(collection="news", query="q"), metadata=(("x-request-id", "req-9"),))
    await call
    assert search.request_ids[-1] == "req-9"
    assert dict(await call.initial_metadata())["x-request-id"] == "req-9"

    made_up = news.Search(pb.SearchRequest(collection="news", query="q"))
    await made_up
    assert dict(await made_up.initial_metadata())["x-request-id"] == search.request_ids[-1]


async def test_query_takes_the_defaults_of_unset_fields(news: pb_grpc.TritonRagAsyncStub, answers: FakeAnswers) -> None:
    answer = await news.Query(pb.QueryRequest(collection="news", query="q"))
    assert answers.queries[-1] == QueryRequest(collection="news", query="q")
    assert answers.queries[-1].sampling == SamplingParams(max_tokens=256)
    assert [(source.citation, source.doc_id, source.cited) for source in answer.sources] == [
        (1, "a", True),
        (2, "b", False),
    ]
    assert (answer.finish_reason, answer.usage.completion_tokens) == ("stop", 5)


@pytest.mark.parametrize("method", ["Query", "QueryStream"])
async def test_query_errors_before_the_first_event(
    news: pb_grpc.TritonRagAsyncStub, answers: FakeAnswers, method: str
) -> None:
    rpc = getattr(news, method)
    assert await failure(rpc(pb.QueryRequest(collection="absent", query="q"))) == (
        grpc.StatusCode.NOT_FOUND,
        "collection 'absent' does not exist",
    )
    answers.start_error = ResourceExhaustedError("the generator's queue is full")
    assert await failure(rpc(pb.QueryRequest(collection="news", query="q"))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the generator's queue is full",
    )


async def test_a_stream_failing_midway_ends_with_the_error_status(
    news: pb_grpc.TritonRagAsyncStub, answers: FakeAnswers
) -> None:
    answers.stream_error = UnavailableError("generator unavailable")
    call = news.QueryStream(pb.QueryRequest(collection="news", query="q"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            received.append(event.WhichOneof("event"))
    assert received == ["sources", "delta"]
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.UNAVAILABLE, "generator unavailable")
    assert answers.streams_closed == [False]


async def test_a_cancelled_stream_closes_the_core_stream(
    news: pb_grpc.TritonRagAsyncStub, answers: FakeAnswers
) -> None:
    answers.stream = "idle"  # the stream waits after its first delta until the call is cancelled
    call = news.QueryStream(pb.QueryRequest(collection="news", query="q"))
    for expected in ("sources", "delta"):
        event = await call.read()
        assert isinstance(event, pb.QueryEvent) and event.WhichOneof("event") == expected
    await asyncio.wait_for(answers.stream_paused.wait(), timeout=5)
    assert answers.streams_closed == []

    assert call.cancel()
    await asyncio.wait_for(answers.stream_closed.wait(), timeout=5)
    assert answers.streams_closed == [False]


async def test_use_cache_reaches_the_services(
    news: pb_grpc.TritonRagAsyncStub, search: FakeSearch, answers: FakeAnswers
) -> None:
    await news.Search(pb.SearchRequest(collection="news", query="q", use_cache=False))
    await news.Query(pb.QueryRequest(collection="news", query="q", use_cache=False))
    assert search.searches[-1].use_cache is False and answers.queries[-1].use_cache is False


async def test_search_grouped_by_document_over_grpc_and_http(
    news: pb_grpc.TritonRagAsyncStub, fakes: FakeServices, search: FakeSearch, settings: ApiSettings
) -> None:
    found = await news.Search(pb.SearchRequest(collection="news", query="q", group_by="document"))
    assert search.searches[-1].group_by == "document"
    assert [(hit.doc_id, list(hit.other_chunk_ids)) for hit in found.hits] == [("a", [100]), ("b", [101])]
    with TestClient(fakes.http_app(settings)) as client:
        answer = client.post("/v1/search", json={"collection": "news", "query": "q", "group_by": "document"})
    assert [(hit["doc_id"], hit["other_chunk_ids"]) for hit in answer.json()["hits"]] == [("a", [100]), ("b", [101])]
    code, message = await failure(news.Search(pb.SearchRequest(collection="news", query="q", group_by="page")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "group_by" in message

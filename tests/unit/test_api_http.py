"""The HTTP front-end over in-memory services: routes, status codes and the error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeAnswers, FakeReadiness, FakeSearch, FakeServices, answer_pieces, sse_events
from tests.harness import serving, wait_until
from tritonrag.clients.http_client import ApiError, TritonRagClient
from tritonrag.clients.wire.schema import (
    CollectionCreate,
    DeltaEvent,
    DocumentIn,
    DoneEvent,
    FinishReason,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchRequest,
    SourcesEvent,
)
from tritonrag.server.config import ApiSettings
from tritonrag.server.errors import ResourceExhaustedError, UnavailableError

LIMIT = 4096


@pytest.fixture
def client(fakes: FakeServices) -> Iterator[TestClient]:
    app = fakes.http_app(ApiSettings(max_request_bytes=LIMIT))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: httpx2.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    return error


def docs(*ids: str, **metadata: Any) -> dict[str, Any]:
    return {"documents": [{"id": doc_id, "text": f"text of {doc_id}", "metadata": metadata} for doc_id in ids]}


@pytest.fixture
def news(client: TestClient) -> TestClient:
    """``client`` with a collection "news" of documents a, b (lang en) and c (lang fr)."""
    client.post("/v1/collections", json={"name": "news"})
    client.post("/v1/collections/news/documents", json=docs("a", "b", lang="en"))
    client.post("/v1/collections/news/documents", json=docs("c", lang="fr"))
    return client


def test_collection_lifecycle(client: TestClient) -> None:
    header = {"metadata_field": "headline", "first_line": False, "max_tokens": 16}
    created = client.post("/v1/collections", json={"name": "news", "chunking": {"chunk_tokens": 128, "header": header}})
    assert created.status_code == 201
    assert created.json()["chunking"] == {"chunk_tokens": 128, "overlap_tokens": 40, "header": header}
    assert (created.json()["index_type"], created.json()["language"]) == ("auto", "english")

    duplicate = client.post("/v1/collections", json={"name": "news"})
    assert duplicate.status_code == 409
    assert error_of(duplicate) == {"code": "ALREADY_EXISTS", "message": "collection 'news' exists", "field": "name"}

    assert [c["name"] for c in client.get("/v1/collections").json()["collections"]] == ["news"]
    assert client.get("/v1/collections/news").json()["documents"] == 0

    deleted = client.delete("/v1/collections/news")
    assert (deleted.status_code, deleted.content) == (204, b"")
    missing = client.get("/v1/collections/news")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "NOT_FOUND"
    assert client.delete("/v1/collections/news").status_code == 404


def test_documents_inline_and_as_a_job(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "news"})
    upserted = client.post("/v1/collections/news/documents", json=docs("a/1", "b", year=2020))
    assert upserted.status_code == 200
    assert upserted.json() == {"collection": "news", "documents": 2, "chunks": 2, "job_id": None, "revision": None}

    document = client.get("/v1/collections/news/documents/a/1")  # ids may hold slashes
    assert document.status_code == 200
    assert document.json()["metadata"] == {"year": 2020}
    assert client.delete("/v1/collections/news/documents/a/1").status_code == 204
    assert error_of(client.get("/v1/collections/news/documents/a/1"))["code"] == "NOT_FOUND"
    assert client.post("/v1/collections/absent/documents", json=docs("a")).status_code == 404

    job = client.post("/v1/collections/news/documents", json=docs("c", "d", "e"))
    assert job.status_code == 202
    job_id = job.json()["job_id"]
    assert job.headers["location"] == f"/v1/jobs/{job_id}"
    info = client.get(f"/v1/jobs/{job_id}")
    assert (info.status_code, info.json()["status"], info.json()["total"]) == (200, "queued", 3)
    assert client.get("/v1/jobs/nope").status_code == 404


def test_delete_by_filter_and_search(client: TestClient, search: FakeSearch) -> None:
    client.post("/v1/collections", json={"name": "news"})
    client.post("/v1/collections/news/documents", json=docs("a", "b", lang="en"))
    client.post("/v1/collections/news/documents", json=docs("c", lang="fr"))

    found = client.post("/v1/search", json={"collection": "news", "query": "text", "top_k": 2})
    assert found.status_code == 200
    body = found.json()
    assert [hit["doc_id"] for hit in body["hits"]] == ["a", "b"]
    assert body["hits"][0]["scores"] == {"dense": 0.5, "sparse": 2.0}
    assert body["timings_ms"] == {"total": 1.5}
    assert search.searches[-1] == SearchRequest(collection="news", query="text", top_k=2)

    deleted = client.post(
        "/v1/collections/news/documents:delete", json={"filters": {"field": "lang", "op": "eq", "value": "en"}}
    )
    assert deleted.json() == {"deleted": 2, "revision": None}  # the stand-in service tells no revision
    assert client.get("/v1/collections/news").json()["documents"] == 1


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        ("/v1/collections", {"name": "bad name"}, "name", "name: String should match pattern"),
        (
            "/v1/collections",
            {"name": "ok", "chunking": {"chunk_tokens": 64, "overlap_tokens": 64}},
            "chunking",
            "chunking: overlap_tokens must be smaller than chunk_tokens",
        ),
        (
            "/v1/collections/news/documents",
            {"documents": [{"id": "a", "text": "  "}]},
            "documents.0.text",
            "documents.0.text: text is empty",
        ),
        ("/v1/collections/news/documents", {"documents": []}, "documents", "documents: List should have at least 1"),
        ("/v1/search", {"collection": "news", "query": "q", "top_k": 0}, "top_k", "top_k: Input should be greater"),
        ("/v1/search", {"collection": "news", "query": "q", "colour": 1}, "colour", "colour: Extra inputs"),
        (
            "/v1/query",
            {"collection": "news", "query": "q", "sampling": {"temperature": 3}},
            "sampling.temperature",
            "sampling.temperature: Input should be less than or equal to 2",
        ),
        (
            "/v1/query",
            {"collection": "news", "query": "q", "stream": True, "sampling": {"stop": ["."] * 9}},
            "sampling.stop",
            "sampling.stop: List should have at most 8 items",
        ),
        ("/v1/query", {"collection": "news", "query": " ", "stream": True}, "query", "query: query is empty"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], field: str, message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert (error["code"], error["field"]) == ("INVALID_ARGUMENT", field)
    assert error["message"].startswith(message)


def test_malformed_json_is_422_with_a_message(client: TestClient) -> None:
    response = client.post("/v1/search", content=b'{"collection": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_of(response) == {
        "code": "INVALID_ARGUMENT",
        "message": "malformed JSON at position 15: Expecting value",
        "field": None,
    }


def test_bodies_over_the_limit_are_413_by_length_or_while_streaming(client: TestClient) -> None:
    big = {"collection": "news", "query": "q" * LIMIT}
    declared = client.post("/v1/search", json=big)
    assert declared.status_code == 413
    assert error_of(declared)["code"] == "RESOURCE_EXHAUSTED"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"collection": "news", "query": "'
        yield b"q" * LIMIT
        yield b'"}'

    streamed = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert error_of(streamed)["code"] == "RESOURCE_EXHAUSTED"


def test_unknown_routes_and_methods_use_the_error_body(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing"))["code"] == "NOT_FOUND"
    wrong_method = client.put("/v1/search")
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "UNIMPLEMENTED"


def test_a_bug_is_500_without_details(client: TestClient, search: FakeSearch, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(request: SearchRequest, request_id: str | None = None) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(search, "search", broken)
    response = client.post("/v1/search", json={"collection": "news", "query": "q"})
    assert response.status_code == 500
    assert error_of(response) == {"code": "INTERNAL", "message": "internal error", "field": None}


def test_health_and_readiness(client: TestClient, readiness: FakeReadiness) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    readiness.ready["triton"] = False
    not_ready = client.get("/readyz")
    assert (not_ready.status_code, not_ready.json()) == (503, {"triton": False, "stores": True})


def test_openapi_describes_the_routes_and_the_error_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/search"]["post"]["operationId"] == "search"
    assert set(spec["paths"]) >= {
        "/v1/collections",
        "/v1/collections/{name}",
        "/v1/collections/{name}/documents",
        "/v1/collections/{name}/documents/{doc_id}",
        "/v1/collections/{name}/documents:delete",
        "/v1/search",
        "/v1/query",
        "/v1/jobs/{job_id}",
        "/healthz",
        "/readyz",
    }
    invalid = spec["paths"]["/v1/search"]["post"]["responses"]["422"]
    assert invalid["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorBody"
    assert client.get("/docs").status_code == 200

    answers = spec["paths"]["/v1/query"]["post"]["responses"]["200"]["content"]
    assert answers["application/json"]["schema"]["$ref"] == "#/components/schemas/QueryResponse"
    assert "text/event-stream" in answers


# POST /v1/query


def test_query_answers_with_numbered_sources(news: TestClient, answers: FakeAnswers) -> None:
    body = {"collection": "news", "query": "what is new?", "filters": {"field": "lang", "op": "eq", "value": "en"}}
    answered = news.post("/v1/query", json=body, headers={"x-request-id": "req-1"})
    assert answered.status_code == 200
    assert answered.headers["x-request-id"] == "req-1"
    answer = QueryResponse.model_validate(answered.json())
    assert answer.answer == "".join(answer_pieces("what is new?", 2))
    assert [(source.citation, source.doc_id, source.cited) for source in answer.sources] == [
        (1, "a", True),
        (2, "b", False),
    ]
    assert (answer.finish_reason, answer.usage.completion_tokens, answer.dropped_passages) == (FinishReason.stop, 5, 0)
    assert answers.queries[-1] == QueryRequest.model_validate(body)  # generation takes its defaults: max_tokens 256
    assert answers.queries[-1].sampling == SamplingParams(max_tokens=256)
    assert answers.request_ids[-1] == "req-1"

    news.post("/v1/query", json={"collection": "news", "query": "q"})
    assert answers.request_ids[-1] and answers.request_ids[-1] != "req-1"  # made up when not given


def test_query_streams_sources_deltas_and_done(news: TestClient, answers: FakeAnswers) -> None:
    answers.degraded = ["rerank"]
    body = {"collection": "news", "query": "what is new?", "top_k": 2, "sampling": {"max_tokens": 3}}
    whole = QueryResponse.model_validate(news.post("/v1/query", json=body).json())
    streamed = news.post("/v1/query", json=body | {"stream": True}, headers={"x-request-id": "req-2"})
    assert (streamed.status_code, streamed.headers["x-request-id"]) == (200, "req-2")
    assert streamed.headers["cache-control"] == "no-cache"

    events = sse_events(streamed)
    assert [name for name, _ in events] == ["sources", "delta", "delta", "delta", "done"]
    assert all(data["type"] == name for name, data in events)
    sources = SourcesEvent.model_validate(events[0][1])
    deltas = [DeltaEvent.model_validate(data) for _, data in events[1:-1]]
    done = DoneEvent.model_validate(events[-1][1])
    assert sources == SourcesEvent(sources=whole.sources, dropped_passages=0, degraded=["rerank"])
    assert "".join(delta.text for delta in deltas) == whole.answer == "".join(answer_pieces("what is new?", 2)[:3])
    assert (done.usage, done.finish_reason, done.timings_ms) == (whole.usage, FinishReason.length, whole.timings_ms)
    assert (done.cited, done.degraded) == ([], ["rerank"])
    assert answers.queries[-1] == QueryRequest.model_validate(body | {"stream": True})
    assert answers.streams_closed == [True, True]


@pytest.mark.parametrize("stream", [False, True])
def test_query_errors_before_the_first_event_are_error_answers(
    news: TestClient, answers: FakeAnswers, stream: bool
) -> None:
    missing = news.post("/v1/query", json={"collection": "absent", "query": "q", "stream": stream})
    assert missing.status_code == 404
    assert error_of(missing) == {"code": "NOT_FOUND", "message": "collection 'absent' does not exist", "field": None}

    answers.start_error = ResourceExhaustedError("the generator's queue is full")
    busy = news.post("/v1/query", json={"collection": "news", "query": "q", "stream": stream})
    assert busy.status_code == 429
    assert error_of(busy) == {"code": "RESOURCE_EXHAUSTED", "message": "the generator's queue is full", "field": None}


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (UnavailableError("generator unavailable"), {"code": "UNAVAILABLE", "message": "generator unavailable"}),
        (RuntimeError("secret internals"), {"code": "INTERNAL", "message": "internal error"}),
    ],
)
def test_query_errors_after_the_first_event_are_error_events(
    news: TestClient, answers: FakeAnswers, failure: Exception, error: dict[str, str]
) -> None:
    answers.stream_error = failure
    streamed = news.post("/v1/query", json={"collection": "news", "query": "q", "stream": True})
    assert streamed.status_code == 200
    events = sse_events(streamed)
    assert [name for name, _ in events] == ["sources", "delta", "error"]
    assert events[-1][1] == {"error": error | {"field": None}}
    assert answers.streams_closed == [False]


# Over a real server: the SDK, and a client that goes away mid-stream


@pytest.fixture
def served(fakes: FakeServices) -> Iterator[str]:
    """The HTTP API over the fakes served by uvicorn in a thread; its base URL."""
    with serving(fakes.http_app(ApiSettings(max_request_bytes=LIMIT))) as url:
        yield url


def test_sdk_query_and_query_stream(served: str, answers: FakeAnswers) -> None:
    request = QueryRequest(collection="news", query="what is new?", sampling=SamplingParams(seed=7))
    with TritonRagClient(served) as sdk:
        for call in (sdk.query, lambda request: list(sdk.query_stream(request))):
            with pytest.raises(ApiError) as missing:
                call(request)
            assert (missing.value.status, missing.value.code) == (404, "NOT_FOUND")

        sdk.create_collection(CollectionCreate(name="news"))
        sdk.upsert("news", [DocumentIn(id="a", text="text of a", metadata={"year": 2020})])
        answer = sdk.query(request, request_id="req-3")
        assert answers.queries[-1] == request and answers.request_ids[-1] == "req-3"
        events = list(sdk.query_stream(request, request_id="req-4"))
        assert answers.queries[-1] == request.model_copy(update={"stream": True}) and answers.request_ids[-1] == "req-4"

        assert [type(event) for event in events] == [SourcesEvent] + [DeltaEvent] * 5 + [DoneEvent]
        sources, *deltas, done = events
        assert isinstance(sources, SourcesEvent) and isinstance(done, DoneEvent)
        assert [source.model_copy(update={"cited": True}) for source in sources.sources] == answer.sources
        assert sources.sources[0].metadata == {"year": 2020}
        assert "".join(delta.text for delta in deltas if isinstance(delta, DeltaEvent)) == answer.answer
        assert (done.usage, done.finish_reason, done.cited) == (answer.usage, answer.finish_reason, [1])

        answers.stream_error = UnavailableError("generator unavailable")
        received = []
        with pytest.raises(ApiError) as failed:
            for event in sdk.query_stream(request):
                received.append(event)
        assert (failed.value.status, failed.value.code, failed.value.message) == (
            200,
            "UNAVAILABLE",
            "generator unavailable",
        )
        assert [type(event) for event in received] == [SourcesEvent, DeltaEvent]


def test_a_client_going_away_mid_stream_closes_the_core_stream(served: str, answers: FakeAnswers) -> None:
    answers.stream = "idle"  # the stream waits after its first delta until the client goes away
    with TritonRagClient(served) as sdk:
        sdk.create_collection(CollectionCreate(name="news"))
        sdk.upsert("news", [DocumentIn(id="a", text="text of a")])
        events = sdk.query_stream(QueryRequest(collection="news", query="q"))
        assert isinstance(next(events), SourcesEvent)
        assert isinstance(next(events), DeltaEvent)
        wait_until(answers.stream_paused.is_set, "the stream to pause")
        assert answers.streams_closed == []
        events.close()  # leaving the loop early closes the connection

        wait_until(lambda: answers.streams_closed == [False], "the core stream to be closed")
        assert answers.streams_started == 1

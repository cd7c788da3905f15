"""Request ids over HTTP: every answer carries ``x-request-id``, and the services receive the same id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeServices
from tritonrag.clients.wire.schema import SearchRequest
from tritonrag.server.config import ApiSettings

LIMIT = 4096
CHAT = {"model": "generator", "messages": [{"role": "user", "content": "Capital of France?"}]}
QUERY = {"collection": "news", "query": "what is new?"}


@pytest.fixture
def fakes() -> FakeServices:
    return FakeServices.create()


@pytest.fixture
def client(fakes: FakeServices) -> Iterator[TestClient]:
    """The HTTP API over the fakes, with a collection "news" of one document."""
    with TestClient(fakes.http_app(ApiSettings(max_request_bytes=LIMIT)), raise_server_exceptions=False) as client:
        client.post("/v1/collections", json={"name": "news"})
        client.post("/v1/collections/news/documents", json={"documents": [{"id": "a", "text": "text of a"}]})
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "content_type"),
    [
        ("GET", "/v1/collections", None, 200, "application/json"),  # native
        ("GET", "/healthz", None, 200, "application/json"),
        ("GET", "/v1/models", None, 200, "application/json"),  # OpenAI-compatible
        ("POST", "/v1/embeddings", {"model": "embedder", "input": "text"}, 200, "application/json"),
        ("POST", "/v1/query", QUERY | {"stream": True}, 200, "text/event-stream"),  # native SSE
        ("POST", "/v1/chat/completions", CHAT | {"stream": True}, 200, "text/event-stream"),  # OpenAI SSE
        ("GET", "/v1/collections/absent", None, 404, "application/json"),  # a service's error
        ("GET", "/v1/nothing", None, 404, "application/json"),  # no such route
        ("PUT", "/v1/search", None, 405, "application/json"),
        ("POST", "/v1/search", {"collection": "news"}, 422, "application/json"),
        ("POST", "/v1/search", {"collection": "news", "query": "q" * LIMIT}, 413, "application/json"),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "application/json"),  # OpenAI's error
        ("POST", "/v1/query", {"collection": "absent", "query": "q", "stream": True}, 404, "application/json"),
    ],
)
def test_every_answer_returns_the_request_id(
    client: TestClient, method: str, path: str, body: dict[str, Any] | None, status: int, content_type: str
) -> None:
    given = client.request(method, path, json=body, headers={"x-request-id": "req-7"})
    assert (given.status_code, given.headers["x-request-id"]) == (status, "req-7")
    assert given.headers["content-type"].startswith(content_type)

    made_up = [client.request(method, path, json=body).headers["x-request-id"] for _ in range(2)]
    assert all(re.fullmatch("[0-9a-f]{32}", request_id) for request_id in made_up)  # uuid4 hex
    assert made_up[0] != made_up[1]


def test_a_bug_answers_500_with_the_request_id(
    client: TestClient, fakes: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: SearchRequest, request_id: str | None = None) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(fakes.search, "search", broken)
    response = client.post("/v1/search", json={"collection": "news", "query": "q"}, headers={"x-request-id": "r-500"})
    assert (response.status_code, response.headers["x-request-id"]) == (500, "r-500")


def test_the_request_id_reaches_the_services(client: TestClient, fakes: FakeServices) -> None:
    calls = [
        ("/v1/search", {"collection": "news", "query": "q"}, fakes.search.request_ids),
        ("/v1/query", QUERY, fakes.answers.request_ids),
        ("/v1/query", QUERY | {"stream": True}, fakes.answers.request_ids),
        ("/v1/chat/completions", CHAT, fakes.answers.request_ids),
        ("/v1/chat/completions", CHAT | {"stream": True}, fakes.answers.request_ids),
        ("/v1/completions", {"model": "generator", "prompt": "Paris is"}, fakes.answers.request_ids),
        ("/v1/embeddings", {"model": "embedder", "input": "text"}, fakes.models.request_ids),
    ]
    for number, (path, body, received) in enumerate(calls):
        given = f"req-{number}"
        assert client.post(path, json=body, headers={"x-request-id": given}).status_code == 200
        assert received[-1] == given, path

    answered = client.post("/v1/search", json={"collection": "news", "query": "q"})
    assert fakes.search.request_ids[-1] == answered.headers["x-request-id"]  # a made-up one is the same

"""The HTTP front-end over an in-memory core: routes, status codes and the error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from tests.fake_core import FakeCore
from tritonrag.server.api.http import create_http_app
from tritonrag.server.config import ApiSettings
from tritonrag.server.schema import SearchRequest

LIMIT = 4096


@pytest.fixture
def core() -> FakeCore:
    return FakeCore(inline_max_documents=2)


@pytest.fixture
def client(core: FakeCore) -> Iterator[TestClient]:
    app = create_http_app(core, ApiSettings(max_request_bytes=LIMIT))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: httpx2.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    return error


def docs(*ids: str, **metadata: Any) -> dict[str, Any]:
    return {"documents": [{"id": doc_id, "text": f"text of {doc_id}", "metadata": metadata} for doc_id in ids]}


def test_collection_lifecycle(client: TestClient) -> None:
    created = client.post("/v1/collections", json={"name": "news", "chunking": {"chunk_tokens": 128}})
    assert created.status_code == 201
    assert created.json()["chunking"] == {"chunk_tokens": 128, "overlap_tokens": 40}
    assert created.json()["index_type"] == "auto"

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
    assert upserted.json() == {"collection": "news", "documents": 2, "chunks": 2, "job_id": None}

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


def test_delete_by_filter_and_search(client: TestClient, core: FakeCore) -> None:
    client.post("/v1/collections", json={"name": "news"})
    client.post("/v1/collections/news/documents", json=docs("a", "b", lang="en"))
    client.post("/v1/collections/news/documents", json=docs("c", lang="fr"))

    found = client.post("/v1/search", json={"collection": "news", "query": "text", "top_k": 2})
    assert found.status_code == 200
    body = found.json()
    assert [hit["doc_id"] for hit in body["hits"]] == ["a", "b"]
    assert body["hits"][0]["scores"] == {"dense": 0.5, "sparse": 2.0}
    assert body["timings_ms"] == {"total": 1.5}
    assert core.searches[-1] == SearchRequest(collection="news", query="text", top_k=2)

    deleted = client.post(
        "/v1/collections/news/documents:delete", json={"filters": {"field": "lang", "op": "eq", "value": "en"}}
    )
    assert deleted.json() == {"deleted": 2}
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


def test_a_bug_is_500_without_details(client: TestClient, core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(request: SearchRequest) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(core, "search", broken)
    response = client.post("/v1/search", json={"collection": "news", "query": "q"})
    assert response.status_code == 500
    assert error_of(response) == {"code": "INTERNAL", "message": "internal error", "field": None}


def test_health_and_readiness(client: TestClient, core: FakeCore) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    core.ready["triton"] = False
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
        "/v1/jobs/{job_id}",
        "/healthz",
        "/readyz",
    }
    invalid = spec["paths"]["/v1/search"]["post"]["responses"]["422"]
    assert invalid["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorBody"
    assert client.get("/docs").status_code == 200

"""Input limits: each one at its limit passes and one over is refused naming the field and the limit, the same
over HTTP (422) and gRPC (INVALID_ARGUMENT); queries are cleaned of control characters on both."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format
from google.protobuf.message import Message

from tests.fakes import FakeAnswers, FakeSearch, FakeServices, grpc_channel
from tests.unit.test_api_grpc import failure
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import (
    MAX_CHAT_MESSAGES,
    MAX_FIELD_CHARS,
    MAX_FILTER_CONDITIONS,
    MAX_FILTER_DEPTH,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    MAX_METADATA_BYTES,
    MAX_QUERY_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_UPSERT_DOCUMENTS,
    CollectionCreate,
    clean_query,
)
from tritonrag.server.api.openai.protocol import MAX_EMBEDDING_INPUTS
from tritonrag.server.config import ApiSettings

pytestmark = pytest.mark.anyio


def condition(value: Any = 1, op: str = "eq") -> dict[str, Any]:
    return {"field": "year", "op": op, "value": value}


def nested(depth: int) -> dict[str, Any]:
    """A filter ``depth`` levels deep: a condition inside ``depth - 1`` one-part ``and``s."""
    node = condition()
    for _ in range(depth - 1):
        node = {"and": [node]}
    return node


def documents(count: int, **metadata: Any) -> list[dict[str, Any]]:
    return [{"id": f"d{i}", "text": f"text {i}", "metadata": metadata} for i in range(count)]


# What a request at a limit and one over it hold, and what the refusal names: (kind, at the limit, over it,
# field, message). The kinds are the routes: search, query, upsert (into "news"), delete (by filter, in "news").
Case = tuple[str, dict[str, Any], dict[str, Any], str, str]
LIMITS: dict[str, Case] = {
    "query length": (
        "search",
        {"query": "q" * MAX_QUERY_CHARS},
        {"query": "q" * (MAX_QUERY_CHARS + 1)},
        "query",
        f"String should have at most {MAX_QUERY_CHARS} characters",
    ),
    "search top_k": ("search", {"top_k": 100}, {"top_k": 101}, "top_k", "Input should be less than or equal to 100"),
    "rerank_top_n": (
        "search",
        {"rerank": True, "rerank_top_n": 200},
        {"rerank": True, "rerank_top_n": 201},
        "rerank_top_n",
        "Input should be less than or equal to 200",
    ),
    "filter depth": (
        "search",
        {"filters": nested(MAX_FILTER_DEPTH)},
        {"filters": nested(MAX_FILTER_DEPTH + 1)},
        "filters",
        f"filter nesting depth {MAX_FILTER_DEPTH + 1} is over the limit of {MAX_FILTER_DEPTH}",
    ),
    "filter conditions": (
        "search",
        {"filters": {"or": [condition(i) for i in range(MAX_FILTER_CONDITIONS)]}},
        {"filters": {"or": [condition(i) for i in range(MAX_FILTER_CONDITIONS + 1)]}},
        "filters",
        f"filter of {MAX_FILTER_CONDITIONS + 1} conditions is over the limit of {MAX_FILTER_CONDITIONS}",
    ),
    "in values": (
        "search",
        {"filters": condition(list(range(MAX_IN_VALUES)), "in")},
        {"filters": condition(list(range(MAX_IN_VALUES + 1)), "in")},
        "filters.condition",
        f"'in' list of {MAX_IN_VALUES + 1} values is over the limit of {MAX_IN_VALUES}",
    ),
    "filter values": (
        "search",
        {"filters": {"or": [condition(list(range(MAX_IN_VALUES)), "in")] * (MAX_FILTER_VALUES // MAX_IN_VALUES)}},
        {
            "filters": {
                "or": [condition(list(range(MAX_IN_VALUES)), "in")] * (MAX_FILTER_VALUES // MAX_IN_VALUES)
                + [condition()]
            }
        },
        "filters",
        f"filter of {MAX_FILTER_VALUES + 1} values is over the limit of {MAX_FILTER_VALUES}",
    ),
    "delete filter depth": (
        "delete",
        {"filters": nested(MAX_FILTER_DEPTH)},
        {"filters": nested(MAX_FILTER_DEPTH + 1)},
        "filters",
        f"filter nesting depth {MAX_FILTER_DEPTH + 1} is over the limit of {MAX_FILTER_DEPTH}",
    ),
    "documents per upsert": (
        "upsert",
        {"documents": documents(MAX_UPSERT_DOCUMENTS)},
        {"documents": documents(MAX_UPSERT_DOCUMENTS + 1)},
        "documents",
        f"List should have at most {MAX_UPSERT_DOCUMENTS} items",
    ),
    "metadata size": (  # {"k":"x…"} is 8 bytes and the string
        "upsert",
        {"documents": documents(1, k="x" * (MAX_METADATA_BYTES - 8))},
        {"documents": documents(1, k="x" * (MAX_METADATA_BYTES - 7))},
        "documents.0.metadata",
        f"metadata of {MAX_METADATA_BYTES + 1} bytes (as JSON) is over the limit of {MAX_METADATA_BYTES}",
    ),
    "metadata key": (
        "upsert",
        {"documents": documents(1, **{"k" * MAX_FIELD_CHARS: 1})},
        {"documents": documents(1, **{"k" * (MAX_FIELD_CHARS + 1): 1})},
        "documents.0.metadata",
        f"metadata key of {MAX_FIELD_CHARS + 1} characters is over the limit of {MAX_FIELD_CHARS}",
    ),
    "metadata nesting": (
        "upsert",
        {"documents": documents(1, tags=["a", "b"])},
        {"documents": documents(1, tags=[["a"], ["b"]])},
        "documents.0.metadata.tags",
        "metadata values are strings, numbers, booleans or flat lists of them, not nested",
    ),
    "query top_k": ("query", {"top_k": 50}, {"top_k": 51}, "top_k", "Input should be less than or equal to 50"),
    "max_tokens": (
        "query",
        {"sampling": {"max_tokens": 8192}},
        {"sampling": {"max_tokens": 8193}},
        "sampling.max_tokens",
        "Input should be less than or equal to 8192",
    ),
    "stop strings": (
        "query",
        {"sampling": {"stop": ["."] * MAX_STOP_STRINGS}},
        {"sampling": {"stop": ["."] * (MAX_STOP_STRINGS + 1)}},
        "sampling.stop",
        f"List should have at most {MAX_STOP_STRINGS} items",
    ),
    "stop string length": (
        "query",
        {"sampling": {"stop": ["x" * MAX_STOP_CHARS]}},
        {"sampling": {"stop": [".", "x" * (MAX_STOP_CHARS + 1)]}},
        "sampling.stop",
        f"stop string 1 of {MAX_STOP_CHARS + 1} characters is over the limit of {MAX_STOP_CHARS}",
    ),
}

_PATHS = {
    "search": "/v1/search",
    "query": "/v1/query",
    "upsert": "/v1/collections/news/documents",
    "delete": "/v1/collections/news/documents:delete",
}
_BASES: dict[str, dict[str, Any]] = {
    "search": {"collection": "news", "query": "q"},
    "query": {"collection": "news", "query": "q"},
    "upsert": {},
    "delete": {},
}


def http_body(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {**_BASES[kind], **fields}


_RPCS: dict[str, tuple[str, type[Message]]] = {
    "search": ("Search", pb.SearchRequest),
    "query": ("Query", pb.QueryRequest),
    "upsert": ("UpsertDocuments", pb.UpsertDocumentsRequest),
    "delete": ("DeleteByFilter", pb.DeleteByFilterRequest),
}


def grpc_call(stub: pb_grpc.TritonRagAsyncStub, kind: str, fields: dict[str, Any]) -> Any:
    """The RPC of ``kind`` with the request the HTTP body holds (in its JSON form), in the collection "news"."""
    method, message = _RPCS[kind]
    return getattr(stub, method)(json_format.ParseDict({**http_body(kind, fields), "collection": "news"}, message()))


@pytest.fixture
def client(fakes: FakeServices) -> Iterator[TestClient]:
    """The HTTP API over the fakes with the default body limit (16 MiB), and the collection "news"."""
    with TestClient(fakes.http_app(ApiSettings()), raise_server_exceptions=False) as test_client:
        test_client.post("/v1/collections", json={"name": "news"})
        yield test_client


@pytest.fixture
async def stub(fakes: FakeServices) -> AsyncIterator[pb_grpc.TritonRagAsyncStub]:
    """The gRPC API over the fakes with the default message limit (16 MiB), and the collection "news"."""
    await fakes.collections.create_collection(CollectionCreate(name="news"))
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers) as channel:
        yield pb_grpc.TritonRagStub(channel)


@pytest.mark.parametrize(("kind", "at_limit", "over", "field", "message"), LIMITS.values(), ids=list(LIMITS))
def test_a_limit_over_http(
    client: TestClient, kind: str, at_limit: dict[str, Any], over: dict[str, Any], field: str, message: str
) -> None:
    accepted = client.post(_PATHS[kind], json=http_body(kind, at_limit))
    assert accepted.status_code in (200, 202), accepted.text
    refused = client.post(_PATHS[kind], json=http_body(kind, over))
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("INVALID_ARGUMENT", field)
    assert error["message"].startswith(f"{field}: {message}")


@pytest.mark.parametrize(("kind", "at_limit", "over", "field", "message"), LIMITS.values(), ids=list(LIMITS))
async def test_a_limit_over_grpc(
    stub: pb_grpc.TritonRagAsyncStub,
    kind: str,
    at_limit: dict[str, Any],
    over: dict[str, Any],
    field: str,
    message: str,
) -> None:
    await grpc_call(stub, kind, at_limit)
    code, details = await failure(grpc_call(stub, kind, over))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}: {message}")


def openai_error(client: TestClient, path: str, body: dict[str, Any]) -> tuple[int, str | None, str]:
    response = client.post(path, json=body)
    error = response.json().get("error") or {}
    return response.status_code, error.get("param"), error.get("message", "")


USER = {"role": "user", "content": "hi"}
CHAT = {"model": "generator", "messages": [USER]}
EMBEDDINGS = {"model": "embedder", "input": ["a"]}


@pytest.mark.parametrize(
    ("path", "at_limit", "over", "param", "message"),
    [
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [USER] * MAX_CHAT_MESSAGES},
            {**CHAT, "messages": [USER] * (MAX_CHAT_MESSAGES + 1)},
            "messages",
            f"List should have at most {MAX_CHAT_MESSAGES} items",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 8192},
            {**CHAT, "max_tokens": 8193},
            "max_tokens",
            "Input should be less than or equal to 8192",
        ),
        (
            "/v1/completions",
            {"model": "generator", "prompt": "p", "stop": "x" * MAX_STOP_CHARS},
            {"model": "generator", "prompt": "p", "stop": "x" * (MAX_STOP_CHARS + 1)},
            "stop",
            f"stop string 0 of {MAX_STOP_CHARS + 1} characters is over the limit of {MAX_STOP_CHARS}",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "tritonrag": {"collection": "news", "filters": nested(MAX_FILTER_DEPTH)}},
            {**CHAT, "tritonrag": {"collection": "news", "filters": nested(MAX_FILTER_DEPTH + 1)}},
            "tritonrag.filters",
            f"filter nesting depth {MAX_FILTER_DEPTH + 1} is over the limit of {MAX_FILTER_DEPTH}",
        ),
        (
            "/v1/embeddings",
            {**EMBEDDINGS, "input": ["a"] * MAX_EMBEDDING_INPUTS},
            {**EMBEDDINGS, "input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)},
            "input",
            f"Value should have at most {MAX_EMBEDDING_INPUTS} items",
        ),
    ],
    ids=["messages", "max_tokens", "stop length", "grounding filter depth", "embedding inputs"],
)
def test_a_limit_of_the_openai_api(
    client: TestClient, path: str, at_limit: dict[str, Any], over: dict[str, Any], param: str, message: str
) -> None:
    assert client.post(path, json=at_limit).status_code == 200
    status, refused_param, refused = openai_error(client, path, over)
    assert (status, refused_param) == (400, param)
    assert refused.startswith(f"{param}: {message}")


def test_control_characters_are_removed_from_queries() -> None:
    assert clean_query("a\x00b\tc\r\nd\re\x0bf\x0cg\x1fh\x85i\x7fj\x9bk") == "ab\tc\nd\ne f g h ijk"
    assert clean_query("  caf\u0065\u0301 \x1b[31mred\x1b[0m \n") == "caf\u00e9 [31mred[0m"  # NFC; ESC goes
    assert clean_query("zero\u200bwidth joiners \u200d stay") == "zero\u200bwidth joiners \u200d stay"


def test_every_front_end_searches_the_cleaned_query(
    client: TestClient, search: FakeSearch, answers: FakeAnswers
) -> None:
    dirty = "\x00 capital\x07 of\r\nFrance\x0b? "
    client.post("/v1/search", json={"collection": "news", "query": dirty})
    client.post("/v1/query", json={"collection": "news", "query": dirty})
    assert search.searches[-1].query == answers.queries[-1].query == "capital of\nFrance ?"

    for query in ("\x00\x07", " \r\n\x1b "):
        refused = client.post("/v1/search", json={"collection": "news", "query": query})
        assert refused.status_code == 422
        assert refused.json()["error"] == {
            "code": "INVALID_ARGUMENT",
            "message": "query: query is empty once control characters and surrounding whitespace are removed",
            "field": "query",
        }


async def test_grpc_searches_the_cleaned_query(stub: pb_grpc.TritonRagAsyncStub, search: FakeSearch) -> None:
    await stub.Search(pb.SearchRequest(collection="news", query="\x00 capital\x07 of\r\nFrance\x0b? "))
    assert search.searches[-1].query == "capital of\nFrance ?"
    code, details = await failure(stub.Query(pb.QueryRequest(collection="news", query="\x1b\x00")))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "query: query is empty once control characters and surrounding whitespace are removed",
    )

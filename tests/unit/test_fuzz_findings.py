"""What fuzzing both front-ends found (tests/integration/test_fuzz.py), each kept fixed here."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from tokenizers import Tokenizer

from tests.fakes import FakeServices, grpc_channel
from tests.unit.test_retrieval_collection import cond, matched, open_collection
from tests.unit.test_store_documents import prepared
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import Condition, DocumentIn, Language
from tritonrag.export.runtime.encoding import ModelMetadata, ModelTokenizer
from tritonrag.export.runtime.sampling import Sampler, SamplingParams
from tritonrag.server.api.grpc_service import MAX_STATUS_BYTES, SERVICE_NAME
from tritonrag.server.config import ApiSettings
from tritonrag.server.retrieval.collection import Collection
from tritonrag.server.retrieval.lexical import LexicalIndex
from tritonrag.server.security.keys import KeyStore


@pytest.fixture
def client(fakes: FakeServices, tmp_path: Path) -> Iterator[TestClient]:
    """The HTTP API over the fakes, with the key routes."""
    keys = KeyStore(tmp_path / "keys.sqlite")
    with TestClient(fakes.http_app(ApiSettings(), keys=keys), raise_server_exceptions=False) as test_client:
        yield test_client
    keys.close()


# --- retrieval and the store ----------------------------------------------------------------------


def test_range_filters_take_integers_beyond_sqlites_64_bits(tmp_path: Path) -> None:
    """Such an integer is stored as a float, and was compared as an int, which SQLite cannot bind (500)."""
    collection = open_collection(tmp_path / "c")
    try:
        collection.upsert(
            [prepared("big", ["big common"], {"n": 2**64}), prepared("small", ["small common"], {"n": 5})]
        )
        assert matched(collection, cond("n", "gt", 2**63)) == {"big"}
        assert matched(collection, cond("n", "lte", 2**64)) == {"big", "small"}
        assert matched(collection, cond("n", "lt", -(2**63) - 1)) == set()
    finally:
        collection.close()


def test_closing_a_collection_waits_for_a_write_in_flight_instead_of_deadlocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write holds the store's lock while it waits for the collection's write lock; ``close`` took them the
    other way round, so deleting a collection while its ingestion job wrote hung every later request."""
    collection = open_collection(tmp_path / "c")
    publishing, closing_store, go_on = threading.Event(), threading.Event(), threading.Event()
    write_lexical, close_store = collection._lexical.write, collection._store.close

    def paused_write(*args: Any) -> None:  # inside the store's lock, before the collection's write lock
        publishing.set()
        go_on.wait()
        write_lexical(*args)

    def observed_close() -> None:
        closing_store.set()
        close_store()

    monkeypatch.setattr(collection._lexical, "write", paused_write)
    monkeypatch.setattr(collection._store, "close", observed_close)
    writer = threading.Thread(target=collection.upsert, args=([prepared("d", ["text"])],), daemon=True)
    closer = threading.Thread(target=Collection.close, args=(collection,), daemon=True)
    writer.start()
    publishing.wait()
    closer.start()
    closing_store.wait()  # the store's close now waits for the write
    go_on.set()
    writer.join(timeout=60)
    closer.join(timeout=60)
    assert not writer.is_alive() and not closer.is_alive(), "close and the write deadlocked"


@pytest.mark.parametrize("language", list(Language))
def test_every_language_of_a_collection_has_a_lexical_index(tmp_path: Path, language: Language) -> None:
    """tantivy stems Arabic, Greek, Romanian, Tamil and Turkish but has no stop words of them: creating such a
    collection failed (500), and left it in the catalog, where every later listing failed on it."""
    index = LexicalIndex(tmp_path, language)
    index.write(np.empty(0, np.int64), np.array([1, 2], np.int64), ["the first words", "other words"])
    index.refresh()
    assert index.search("first", 2)[1].tolist() == [1]


# --- the models' runtime --------------------------------------------------------------------------


def test_a_query_longer_than_the_rerankers_window_is_cut_with_its_passage(minilm_dir: Path) -> None:
    """Only the passage was cut, which tokenizers refuses when the query alone fills the window: the reranker
    failed in Triton (a search with ``rerank`` and a long query), and counted on the endpoint's circuit breaker."""
    metadata = ModelMetadata(
        task="reranker",
        head="cross_encoder",
        max_sequence_length=8,
        inputs=("input_ids", "attention_mask", "token_type_ids"),
        pad_token_id=0,
    )
    tokenizer = ModelTokenizer(Tokenizer.from_file(str(minilm_dir / "tokenizer.json")), metadata)
    query = "one two three four five six seven eight nine ten"
    encoding = tokenizer.encode_pair(query, "alpha beta")
    assert len(encoding.ids) == 8 and 1 in encoding.type_ids  # both sequences are there, cut
    assert (
        tokenizer.encode_pair("one two", "alpha beta gamma delta epsilon zeta").ids[:4]
        == tokenizer.encode_pair("one two", "alpha").ids[:4]
    )  # a query that fits is kept whole


# --- the generator's sampling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=5e-324, seed=0),
        SamplingParams(temperature=1.0, repetition_penalty=5e-324, seed=0),
        SamplingParams(temperature=5e-324, repetition_penalty=5e-324, top_p=5e-324, seed=0),
    ],
)
def test_sampling_parameters_near_zero_still_choose_a_token(params: SamplingParams) -> None:
    """Dividing by them overflowed to infinite scores, and the probabilities were NaN: the generation step failed
    in Triton (and counted on the endpoint's circuit breaker)."""
    logits = np.linspace(-10, 10, 32, dtype=np.float32)
    token = Sampler(params).choose(logits, seen=[3, 31])
    assert 0 <= token < 32
    if params.repetition_penalty == 1.0:
        assert token == 31  # a temperature near 0 is greedy


# --- the wire types -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc_id", ["a\x00b", "\x00", "a\nb", "tab\there", "\x7f", "next\x85line"])
def test_document_ids_hold_no_control_characters(doc_id: str) -> None:
    """A NUL ended an id in the store's SQL lists (a second upsert of it failed: 500), and a line feed ends a
    path parameter (GET and DELETE by id found no route)."""
    with pytest.raises(ValidationError, match="no control characters"):
        DocumentIn(id=doc_id, text="text")


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_metadata_and_filter_numbers_are_finite(number: float) -> None:
    """SQLite stores a NaN as NULL, which the metadata table refuses (500); JSON has no infinities."""
    for metadata in ({"n": number}, {"n": [1.5, number]}):
        with pytest.raises(ValidationError, match="finite number"):
            DocumentIn(id="d", text="text", metadata=metadata)
    with pytest.raises(ValidationError, match="finite number"):
        Condition.model_validate({"field": "n", "op": "eq", "value": number})


# --- the front-ends -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_grpc_struct_number_that_json_lacks_is_an_invalid_argument(fakes: FakeServices) -> None:
    """A Struct's NaN has no JSON form, which the request's validation reads: it was INTERNAL."""
    request = pb.SearchRequest(collection="c", query="q")
    request.filters.update({"field": "n", "op": "gte", "value": float("nan")})
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.TritonRagStub(channel).Search(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in (caught.value.details() or "")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\xff\xff\xff\xff",  # no message
        b"\x0a\x03\xed\xa0\x80",  # name: a lone surrogate's bytes, no UTF-8
    ],
)
async def test_a_grpc_request_that_does_not_decode_is_an_invalid_argument(
    fakes: FakeServices, request_bytes: bytes
) -> None:
    """grpcio answered UNKNOWN ("Unexpected DecodeError"), as for a bug of the server."""
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE_NAME}/GetCollection")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_bytes)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("the request is not a valid message")


@pytest.mark.anyio
async def test_a_grpc_status_message_quoting_the_request_stays_readable(fakes: FakeServices) -> None:
    """A NOT_FOUND quoting a long id was a status message over what a client reads: RESOURCE_EXHAUSTED."""
    async with grpc_channel(fakes.collections, fakes.search, fakes.answers) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.TritonRagStub(channel).GetCollection(pb.GetCollectionRequest(name="🙂" * 2_000))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len((caught.value.details() or "").encode()) <= MAX_STATUS_BYTES


def test_a_refusal_lists_ten_problems_and_counts_the_rest(client: TestClient) -> None:
    """A filter with 10,000 unknown keys was refused with a message of 569 KB, all of them listed."""
    filters = {f"k{i}": i for i in range(10_000)}
    refused = client.post("/v1/search", json={"collection": "c", "query": "q", "filters": filters})
    message = refused.json()["error"]["message"]
    assert refused.status_code == 422 and message.count("; ") == 10 and len(message) < 2_000
    assert message.endswith(f"and {len(filters) + 3 - 10} more")  # the keys, and field, op and value missing


def test_a_405_allows_every_method_of_the_path(client: TestClient) -> None:
    """Starlette's named those of the first route at the path alone: ``Allow: POST`` for /v1/collections."""
    refused = client.request("PUT", "/v1/collections")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, POST"
    assert client.request("OPTIONS", "/v1/collections/news/documents/a").headers["allow"] == "DELETE, GET"


def test_an_empty_path_parameter_names_no_resource(client: TestClient) -> None:
    """/v1/collections/ was redirected to the list of collections, another operation's answer."""
    missing = client.get("/v1/collections/", follow_redirects=False)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "NOT_FOUND")


@pytest.mark.parametrize("model_id", ["org/model", "", "/"])
def test_model_ids_may_hold_slashes(client: TestClient, model_id: str) -> None:
    """An id with "/" (as many are: "org/model") matched no route, and got the native 404, not OpenAI's."""
    missing = client.get(f"/v1/models/{model_id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_every_v1_operation_documents_its_error_answers(client: TestClient) -> None:
    """The key routes documented none: their 401, 403 and 404 were answers the document did not describe."""
    paths = client.get("/openapi.json").json()["paths"]
    undocumented = [
        f"{method.upper()} {path}"
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method, operation in operations.items()
        if "default" not in operation["responses"]
    ]
    assert not undocumented


def test_streamed_answers_are_documented_event_by_event(client: TestClient) -> None:
    """Each event of a text/event-stream is an object with its ``data`` (as OpenAPI reads the media type's
    schema); /v1/query documented a string, and the OpenAI streams no event-stream at all."""
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/query", "/v1/chat/completions", "/v1/completions"):
        stream = paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert stream["type"] == "object" and "data" in stream["required"], path

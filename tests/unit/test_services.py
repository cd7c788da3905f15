"""The search and answer services with a stand-in Triton pool: stage order, scores, packing,
streaming and degradation.

Store, indexes, chunker and packing are real; only the pool (the door to Triton) is replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from tests.fakes import grpc_channel, open_guard
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import (
    NO_HEADER,
    CacheStats,
    ChatMessage,
    Chunking,
    CollectionCreate,
    DocumentIn,
    FinishReason,
    GenerationDelta,
    Grounding,
    ModelVersion,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
)
from tritonrag.server.api.admission import Admission
from tritonrag.server.app import Services
from tritonrag.server.cache.keys import Keys
from tritonrag.server.config import (
    IndexSettings,
    LimitsSettings,
    QuerySettings,
    Settings,
)
from tritonrag.server.errors import (
    InvalidArgumentError,
    NotFoundError,
    PayloadTooLargeError,
    ResourceExhaustedError,
    TritonRagError,
    UnavailableError,
)
from tritonrag.server.generation.extractive import NO_PASSAGES_ANSWER
from tritonrag.server.generation.packing import ContextWindow
from tritonrag.server.generation.prompts import SYSTEM_PROMPT, grounded_messages, passage_line
from tritonrag.server.retrieval.collection import STORE_FILE
from tritonrag.server.routing.triton_pool import TritonPool
from tritonrag.server.security.keys import KeyStore
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.store.database import sqlite_database
from tritonrag.server.store.documents import ChunkSpan, DocumentStore, PreparedDocument

DIMENSION = 16


def vector(text: str, dimension: int = DIMENSION) -> npt.NDArray[np.float32]:
    """A deterministic unit vector per word bag: texts sharing words are close."""
    total = np.zeros(dimension, dtype=np.float32)
    for word in text.lower().split():
        seed = int.from_bytes(hashlib.sha256(word.strip(".,?").encode()).digest()[:4], "little")
        total += np.random.default_rng(seed).standard_normal(dimension).astype(np.float32)
    return total / np.linalg.norm(total)


@dataclass
class Generation:
    """One call of the stand-in generator, and how far its stream got."""

    params: SamplingParams
    prompt: str | None
    messages: list[ChatMessage] | None
    request_id: str | None
    model: str | None = None
    deltas_sent: int = 0
    closed: bool = False


class StandInPool:
    """Embeds by word hashing (recording the texts in ``embedded``), reranks by passage length, generates
    ``script`` piece by piece (or raises ``generator_error`` first); ``served`` lists the models it reports
    as ready, at version ``versions[model]`` (default "1"). Each embedding call and each generated piece
    takes ``latency_s`` (as a served model does; none by default)."""

    def __init__(self) -> None:
        self.embedder_up = True
        self.reranker_up = True
        self.generator_error: TritonRagError | None = None
        self.failing_models: set[str] | None = None  # those that raise ``generator_error``; None: all
        self.served = {"embedder", "reranker", "generator"}
        self.versions: dict[str, str] = {}
        self.embedded: list[list[str]] = []
        self.latency_s = 0.0
        self.script = ["Cats purr", " [1]", "."]
        self.generations: list[Generation] = []

    async def embed(
        self,
        texts: Sequence[str],
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        bulk: bool = False,
        version: str | None = None,
    ) -> npt.NDArray[np.float32]:
        if not self.embedder_up:
            raise UnavailableError("embedder is down")
        if version not in (None, self.versions.get("embedder", "1")):
            raise UnavailableError(f"embedder version {version} is not served")
        self.embedded.append(list(texts))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return np.stack([vector(t) for t in texts])

    async def rerank(
        self, query: str, passages: Sequence[str], deadline_s: float | None = None, request_id: str | None = None
    ) -> npt.NDArray[np.float32]:
        if not self.reranker_up:
            raise UnavailableError("reranker is down")
        return np.array([len(p) for p in passages], dtype=np.float32)

    async def generate(
        self,
        params: SamplingParams,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        deadline_s: float | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> AsyncGenerator[GenerationDelta]:
        call = Generation(params, prompt, None if messages is None else list(messages), request_id, model)
        self.generations.append(call)
        try:
            if self.generator_error is not None and (self.failing_models is None or model in self.failing_models):
                raise self.generator_error
            for index, piece in enumerate(self.script, start=1):
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                last = index == len(self.script)
                call.deltas_sent = index
                yield GenerationDelta(
                    text=piece,
                    finish_reason=FinishReason.stop if last else None,
                    prompt_tokens=PROMPT_TOKENS if last else 0,
                    completion_tokens=len(self.script) if last else 0,
                )
        finally:
            call.closed = True

    async def model_version(self, name: str) -> ModelVersion:
        if name not in self.served:
            raise UnavailableError(f"no Triton endpoint serves a ready '{name}'")
        return ModelVersion(name=name, version=self.versions.get(name, "1"))

    async def ready(self, model: str | None = None) -> bool:
        return True


PROMPT_TOKENS = 42  # what the stand-in generator reports
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DOCS = [
    DocumentIn(id="cats", text="Cats purr and sleep all day.", metadata={"kind": "pet"}),
    DocumentIn(
        id="dogs", text="Dogs bark and fetch sticks in the park for a long long time.", metadata={"kind": "pet"}
    ),
    DocumentIn(id="tea", text="Green tea is brewed with water below boiling.", metadata={"kind": "drink"}),
]


def write_generator(repository: Path, context_tokens: int) -> Path:
    """Generator version 1: MiniLM's tokenizer, a ChatML template and a context window of ``context_tokens``."""
    version_dir = repository / "generator" / "1"
    metadata = {
        "task": "generator",
        "head": "causal_lm",
        "max_sequence_length": context_tokens,
        "pad_token_id": 0,
        "inputs": ["input_ids", "attention_mask"],
        "chat_template": CHATML,
        "bos_token": "",
        "eos_token": "<|im_end|>",
    }
    (version_dir / "tritonrag.json").write_text(json.dumps(metadata))
    return version_dir


@pytest.fixture
def services_and_pool(tmp_path: Path, minilm_dir: Path) -> tuple[Services, StandInPool]:
    return services_and_pool_with(tmp_path, minilm_dir)


def services_and_pool_with(
    tmp_path: Path,
    minilm_dir: Path,
    fallback_generator: str | None = None,
    ingest: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[Services, StandInPool]:
    """A services over a stand-in pool and a repository with an embedder and a generator version (the same
    ``tmp_path`` again: another services over the same repository and data)."""
    for model in ("embedder", "generator"):
        (tmp_path / "repository" / model / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "repository" / model / "1" / "tokenizer.json")
    version_dir = tmp_path / "repository" / "embedder" / "1"
    metadata = {
        "task": "embedder",
        "head": "mean_pool",
        "max_sequence_length": 256,
        "pad_token_id": 0,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
    }
    (version_dir / "tritonrag.json").write_text(json.dumps(metadata))
    write_generator(tmp_path / "repository", 512)
    pool = StandInPool()
    settings = Settings(
        data_dir=tmp_path / "data",
        triton={"repository": tmp_path / "repository"},
        models={"fallback_generator": fallback_generator},
        ingest=ingest or {},
        cache=cache or {},
        rollout={"enabled": False},  # roll-outs load versions in Triton: tests/integration/test_rollouts.py
    )
    data = tmp_path / "data"
    services = Services.build(
        settings, cast(TritonPool, pool), Catalog(data / "catalog.sqlite"), KeyStore(data / "keys.sqlite")
    )
    return services, pool


def run_search(
    services: Services, pool: StandInPool | None = None, **fields: object
) -> tuple[list[str], list[str], list[dict[str, float]]]:
    """Fill collection "c", then search; with ``pool`` given, its embedder goes down in between."""

    async def scenario() -> tuple[list[str], list[str], list[dict[str, float]]]:
        await services.collections.create_collection(CollectionCreate(name="c"))
        await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        if pool is not None:
            pool.embedder_up = False
        response = await services.search.search(SearchRequest.model_validate({"collection": "c", **fields}))
        await services.close()
        return [h.doc_id for h in response.hits], response.degraded, [h.scores for h in response.hits]

    return asyncio.run(scenario())


def test_hybrid_fuses_both_rankings(services_and_pool: tuple[Services, StandInPool]) -> None:
    ids, degraded, scores = run_search(services_and_pool[0], query="cats purr", mode="hybrid", top_k=3)
    assert ids[0] == "cats" and degraded == []
    assert {"dense", "sparse", "document", "fused"} <= set(scores[0])


@pytest.mark.parametrize("method", ["rrf", "minmax", "zscore"])
def test_fusion_weights_choose_the_rankings_and_the_method_combines_them(
    services_and_pool: tuple[Services, StandInPool], method: str
) -> None:
    services, _ = services_and_pool

    async def scenario() -> list[SearchResponse]:
        await services.collections.create_collection(CollectionCreate(name="c"))
        await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        responses = []
        for weights in ((0.0, 1.0, 0.0), (1.0, 1.0, 1.0)):
            fusion = dict(zip(("dense", "sparse", "document"), weights, strict=True), method=method)
            request = {"collection": "c", "query": "green tea water", "top_k": 3, "fusion": fusion}
            responses.append(await services.search.search(SearchRequest.model_validate(request)))
        await services.close()
        return responses

    lexical, fused = asyncio.run(scenario())
    # one ranking: no fusion, and no dense search
    assert [h.doc_id for h in lexical.hits] == ["tea"] and set(lexical.hits[0].scores) == {"sparse"}
    assert "dense" not in lexical.timings_ms and "document" not in lexical.timings_ms
    assert fused.hits[0].doc_id == "tea" and set(fused.hits[0].scores) == {"dense", "sparse", "document", "fused"}
    assert [h.score for h in fused.hits] == sorted((h.score for h in fused.hits), reverse=True)
    assert {"dense", "sparse", "document", "fuse"} <= set(fused.timings_ms)


def test_a_query_found_word_for_word_takes_the_verbatim_weights(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, _ = services_and_pool
    dense_else_sparse = {"dense": 1, "sparse": 0, "document": 0, "verbatim": {"dense": 0, "sparse": 1, "document": 0}}
    drinks = {"field": "kind", "op": "eq", "value": "drink"}
    searches = [
        ("Dogs bark and fetch sticks", dense_else_sparse, None),  # in the dogs' text, word for word
        ("sticks fetch bark dogs", dense_else_sparse, None),  # its words, out of order
        ("Dogs bark and fetch sticks", dense_else_sparse, drinks),  # the text holding it is filtered out
        ("Dogs bark and fetch sticks", {"dense": 1, "sparse": 0, "document": 0}, None),  # own weights throughout
    ]

    async def scenario() -> list[SearchResponse]:
        await services.collections.create_collection(CollectionCreate(name="c"))
        await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        responses = []
        for text, fusion, filters in searches:
            request = {"collection": "c", "query": text, "top_k": 3, "fusion": fusion, "filters": filters}
            responses.append(await services.search.search(SearchRequest.model_validate(request)))
        await services.close()
        return responses

    verbatim, shuffled, filtered, own = asyncio.run(scenario())
    assert [set(h.scores) for h in verbatim.hits] == [{"sparse"}] and verbatim.hits[0].doc_id == "dogs"
    assert "verbatim" in verbatim.timings_ms and "dense" not in verbatim.timings_ms
    for response in (shuffled, filtered):
        assert {frozenset(h.scores) for h in response.hits} == {frozenset({"dense"})}
    assert [h.doc_id for h in filtered.hits] == ["tea"]
    assert {frozenset(h.scores) for h in own.hits} == {frozenset({"dense"})} and "verbatim" not in own.timings_ms


def test_chunks_are_embedded_and_indexed_with_their_header_and_returned_without(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    owl = DocumentIn(id="owl", text="Hunts at night.\n\nSoft feathers.", metadata={"title": "Strix aluco"})
    headless = CollectionCreate(name="plain", chunking=Chunking(header=NO_HEADER))

    async def scenario() -> list[SearchResponse]:
        for spec in (CollectionCreate(name="c"), headless):
            await services.collections.create_collection(spec)
            await services.collections.upsert_documents(spec.name, UpsertRequest(documents=[owl, *DOCS]))
        responses = []
        for collection, mode in (("c", "sparse"), ("c", "dense"), ("plain", "sparse")):
            request = {"collection": collection, "query": "strix aluco", "mode": mode, "top_k": 1}
            responses.append(await services.search.search(SearchRequest.model_validate(request)))
        await services.close()
        return responses

    sparse, dense, plain = asyncio.run(scenario())
    owl_texts = [text for texts in pool.embedded for text in texts if "night" in text]
    # the collection with headers, then the one without
    assert owl_texts == ["Strix aluco\nHunts at night.\n\nSoft feathers.", "Hunts at night.\n\nSoft feathers."]
    assert "Cats purr and sleep all day." in pool.embedded[1]  # a one-line document is not its header twice
    for response in (sparse, dense):
        assert [(h.doc_id, h.text) for h in response.hits] == [("owl", "Hunts at night.\n\nSoft feathers.")]
    assert plain.hits == []  # the title is in no text


def test_embedder_down_falls_back_to_bm25(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    ids, degraded, scores = run_search(services, pool, query="green tea", mode="dense", top_k=2)
    assert ids == ["tea"] and degraded == ["embed"]
    assert set(scores[0]) == {"sparse", "document", "fused"}  # BM25 of chunks and of whole documents


def test_rerank_reorders_and_a_down_reranker_keeps_the_retrieval_order(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, _ = services_and_pool
    ids, _, scores = run_search(services, query="pets", mode="dense", top_k=3, rerank=True)
    dense = dict(zip(ids, (s["dense"] for s in scores), strict=True))
    assert sorted(dense, key=lambda doc_id: -dense[doc_id]) == ["cats", "tea", "dogs"]  # the retrieval order
    # The stand-in reranker prefers long passages (dogs, tea, cats); fused with the retrieval order, cats and
    # dogs tie above tea, in retrieval order.
    assert ids == ["cats", "dogs", "tea"]
    assert [s["rerank"] for s in scores] == sorted((s["rerank"] for s in scores), reverse=True)
    assert [s["reranker"] for s in scores] == [28.0, 60.0, 45.0]  # the reranker's own scores (lengths) are kept


def test_a_down_reranker_is_reported(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    pool.reranker_up = False
    ids, degraded, scores = run_search(services, query="cats purr", mode="sparse", top_k=3, rerank=True)
    assert ids[0] == "cats" and degraded == ["rerank"] and "rerank" not in scores[0]


def test_filters_and_unknown_collections(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, _ = services_and_pool
    ids, _, _ = run_search(
        services,
        query="anything at all",
        mode="hybrid",
        top_k=3,
        filters={"field": "kind", "op": "eq", "value": "drink"},
    )
    assert ids == ["tea"]
    with pytest.raises(NotFoundError):
        asyncio.run(services.search.search(SearchRequest(collection="absent", query="x")))


def test_group_by_document_returns_k_documents_each_at_its_best_chunk(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, _ = services_and_pool
    owls = " ".join(f"Owl fact {i}: owls hunt mice at night and sleep by day." for i in range(12))
    documents = [
        DocumentIn(id="owls", text=owls),
        DocumentIn(id="bats", text="Bats hunt insects at night, finding them by echoes."),
        DocumentIn(id="tea", text="Green tea is brewed with water below boiling."),
    ]

    async def scenario() -> tuple[SearchResponse, SearchResponse]:
        chunking = Chunking(chunk_tokens=32, overlap_tokens=0, header=NO_HEADER)
        await services.collections.create_collection(CollectionCreate(name="g", chunking=chunking))
        await services.collections.upsert_documents("g", UpsertRequest(documents=documents))
        asked = {"collection": "g", "query": "owls hunt at night", "mode": "sparse", "top_k": 2}
        by_chunk = await services.search.search(SearchRequest.model_validate(asked))
        by_document = await services.search.search(SearchRequest.model_validate({**asked, "group_by": "document"}))
        await services.close()
        return by_chunk, by_document

    by_chunk, by_document = asyncio.run(scenario())
    assert [hit.doc_id for hit in by_chunk.hits] == ["owls", "owls"]
    assert all(hit.other_chunk_ids == [] for hit in by_chunk.hits)
    owl_hit, bat_hit = by_document.hits
    assert (owl_hit.doc_id, bat_hit.doc_id) == ("owls", "bats")
    assert owl_hit.chunk_id == by_chunk.hits[0].chunk_id  # the document's best chunk
    assert by_chunk.hits[1].chunk_id in owl_hit.other_chunk_ids and len(owl_hit.other_chunk_ids) >= 3
    assert owl_hit.chunk_id not in owl_hit.other_chunk_ids and bat_hit.other_chunk_ids == []


# -- answers ---------------------------------------------------------------------------------

# The stages a grounded answer times with the default search (hybrid: dense, chunk and document BM25).
ANSWER_STAGES = {"embed", "verbatim", "dense", "sparse", "document", "fuse", "search", "pack", "generate", "total"}


def answer(services: Services, scenario: Callable[[Services], Awaitable[Any]]) -> Any:
    """Fill collection "c", run ``scenario`` on the services, close it."""

    async def run() -> Any:
        await services.collections.create_collection(CollectionCreate(name="c"))
        await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        try:
            return await scenario(services)
        finally:
            await services.close()

    return asyncio.run(run())


def query(**fields: Any) -> QueryRequest:
    return QueryRequest.model_validate({"collection": "c", **fields})


def test_query_answers_from_the_packed_passages_and_marks_the_cited_ones(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    response: QueryResponse = answer(
        services, lambda c: c.answers.query(query(query="cats purr", top_k=2), "request-1")
    )
    assert response.answer == "Cats purr [1]."
    assert [s.citation for s in response.sources] == [1, 2] and response.sources[0].doc_id == "cats"
    assert [s.cited for s in response.sources] == [True, False]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (42, 3, 45)
    assert response.finish_reason == FinishReason.stop and response.dropped_passages == 0 and response.degraded == []
    assert set(response.timings_ms) == ANSWER_STAGES
    [call] = pool.generations
    assert call.messages == grounded_messages("cats purr", [s.text for s in response.sources])
    assert call.prompt is None and call.params.max_tokens == 256 and call.request_id == "request-1" and call.closed


def test_passages_that_do_not_fit_the_window_are_dropped(
    services_and_pool: tuple[Services, StandInPool], tmp_path: Path
) -> None:
    services, pool = services_and_pool
    texts = {doc.id: doc.text for doc in DOCS}
    window = ContextWindow.from_version_dir(tmp_path / "repository" / "generator" / "1")

    def cost(citation: int, doc_id: str) -> int:
        return window.count(passage_line(citation, texts[doc_id]) + "\n")

    assert cost(2, "dogs") > cost(2, "tea")
    frame = window.count(window.render(grounded_messages("pets", [])))
    write_generator(tmp_path / "repository", frame + 64 + cost(1, "cats") + cost(2, "tea"))
    request = query(query="pets", mode="dense", top_k=3, rerank=True, sampling={"max_tokens": 64})
    response: QueryResponse = answer(services, lambda c: c.answers.query(request))
    # Reranked (fused with the retrieval order): cats, dogs, tea. Dogs does not fit after cats, tea still does.
    assert [(s.citation, s.doc_id) for s in response.sources] == [(1, "cats"), (2, "tea")]
    assert response.dropped_passages == 1 and "rerank" in response.timings_ms
    assert pool.generations[0].params.max_tokens == 64


def test_max_tokens_is_checked_against_the_window_and_defaults_when_unset(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool

    async def scenario(c: Services) -> None:
        with pytest.raises(InvalidArgumentError, match="leaves") as error:
            await c.answers.query(query(query="cats purr", sampling={"max_tokens": 600}))
        assert error.value.field == "sampling.max_tokens" and pool.generations == []
        await c.answers.query(query(query="cats purr", sampling={}))

    answer(services, scenario)
    assert pool.generations[0].params.max_tokens == 256


def test_the_stream_sends_sources_deltas_then_done(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, _ = services_and_pool

    async def events(c: Services) -> list[QueryEvent]:
        return [event async for event in c.answers.query_stream(query(query="cats purr", top_k=1))]

    sent: list[QueryEvent] = answer(services, events)
    assert [e.type for e in sent] == ["sources", "delta", "delta", "delta", "done"]
    sources, *deltas, done = sent
    assert sources.type == "sources" and [s.doc_id for s in sources.sources] == ["cats"]
    assert [d.text for d in deltas if d.type == "delta"] == ["Cats purr", " [1]", "."]
    assert done.type == "done" and done.cited == [1] and done.usage.total_tokens == 45
    assert set(done.timings_ms) == ANSWER_STAGES


def test_closing_the_stream_closes_the_generation(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool

    async def first_two(c: Services) -> list[QueryEvent]:
        stream = c.answers.query_stream(query(query="cats purr"))
        received = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client went away
        return received

    received: list[QueryEvent] = answer(services, first_two)
    assert [e.type for e in received] == ["sources", "delta"]
    [call] = pool.generations
    assert call.closed and call.deltas_sent == 1


def test_a_failing_generator_gives_an_extractive_answer(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    pool.generator_error = UnavailableError("generator is down")
    response: QueryResponse = answer(services, lambda c: c.answers.query(query(query="cats purr", top_k=2)))
    assert response.answer == "Cats purr and sleep all day. [1]"
    assert response.degraded == ["generate"] and [s.cited for s in response.sources] == [True, False]
    assert response.usage.total_tokens == 0 and response.finish_reason == FinishReason.stop
    assert "generate" in response.timings_ms and pool.generations[0].closed


def test_a_failing_generator_hands_over_to_the_fallback_generator(tmp_path: Path, minilm_dir: Path) -> None:
    services, pool = services_and_pool_with(tmp_path, minilm_dir, fallback_generator="small-generator")
    pool.generator_error = UnavailableError("generator is down")
    pool.failing_models = {"generator"}

    async def twice(c: Services) -> tuple[QueryResponse, QueryResponse]:
        by_fallback = await c.answers.query(query(query="cats purr", top_k=2))
        pool.failing_models = None  # the fallback fails too: an extractive answer
        return by_fallback, await c.answers.query(query(query="cats purr", top_k=2))

    by_fallback, extractive = answer(services, twice)
    assert by_fallback.answer == "Cats purr [1]." and by_fallback.degraded == ["generate"]
    assert extractive.answer == "Cats purr and sleep all day. [1]" and extractive.degraded == ["generate"]
    assert [g.model for g in pool.generations] == ["generator", "small-generator"] * 2
    assert all(g.closed for g in pool.generations)


def test_a_busy_generator_fails_the_stream_before_its_first_event(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    pool.generator_error = ResourceExhaustedError("every generator is busy")

    async def first_event(c: Services) -> QueryEvent:
        return await anext(c.answers.query_stream(query(query="cats purr")))

    with pytest.raises(ResourceExhaustedError):
        answer(services, first_event)
    assert pool.generations[0].closed


def test_an_unserved_generator_gives_an_extractive_answer_from_every_hit(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    pool.served.discard("generator")

    async def embedder_down_too(c: Services) -> QueryResponse:
        pool.embedder_up = False
        return await c.answers.query(query(query="green tea", top_k=3))

    response: QueryResponse = answer(services, embedder_down_too)
    assert response.answer == "Green tea is brewed with water below boiling. [1]"
    assert response.degraded == ["embed", "generate"] and response.dropped_passages == 0
    assert [s.doc_id for s in response.sources] == ["tea"] and response.sources[0].cited
    assert pool.generations == []


def test_no_passages_give_a_fixed_answer_without_generating(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    request = query(query="cats purr", filters={"field": "kind", "op": "eq", "value": "none"})
    response: QueryResponse = answer(services, lambda c: c.answers.query(request))
    assert response.answer == NO_PASSAGES_ANSWER and response.sources == [] and response.degraded == []
    assert "generate" not in response.timings_ms and pool.generations == []


def test_chat_with_grounding_packs_passages_into_the_conversation(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="green tea?")]
    grounding = Grounding(collection="c", top_k=1, mode="sparse")

    async def chat(c: Services) -> tuple[list[str], list[str]]:
        sources, deltas = await c.answers.chat(messages, SamplingParams(), grounding, "request-2")
        return [s.doc_id for s in sources], [d.text async for d in deltas]

    sources, texts = answer(services, chat)
    assert sources == ["tea"] and texts == ["Cats purr", " [1]", "."]
    [call] = pool.generations
    assert call.messages == [
        ChatMessage(role="system", content=f"{SYSTEM_PROMPT}\n\nBe brief."),
        ChatMessage(role="user", content=f"Passages:\n[1] {DOCS[2].text}\n\nQuestion: green tea?"),
    ]
    assert call.params.max_tokens == 256 and call.request_id == "request-2"


def test_chat_without_grounding_and_bad_grounded_chats(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    messages = [ChatMessage(role="user", content="hello")]
    grounding = Grounding(collection="c")

    async def chats(c: Services) -> list[str]:
        sources, deltas = await c.answers.chat(messages, SamplingParams())
        assert sources == []
        texts = [d.text async for d in deltas]
        with pytest.raises(InvalidArgumentError) as no_question:
            await c.answers.chat([ChatMessage(role="system", content="x")], SamplingParams(), grounding)
        assert no_question.value.field == "messages"
        with pytest.raises(InvalidArgumentError) as too_long:
            await c.answers.chat(messages, SamplingParams(max_tokens=600), grounding)
        assert too_long.value.field == "max_tokens"
        return texts

    assert answer(services, chats) == ["Cats purr", " [1]", "."]
    [call] = pool.generations
    assert call.messages == messages and call.params == SamplingParams()


def test_complete_embed_and_served_models(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    pool.served.discard("reranker")

    async def scenario() -> None:
        texts = [d.text async for d in services.answers.complete("Once upon", SamplingParams(max_tokens=5))]
        assert texts == ["Cats purr", " [1]", "."]
        embeddings = await services.models.embed(["hello world", "hi"], "request-3")
        assert embeddings.model == ModelVersion(name="embedder", version="1")
        assert np.allclose(embeddings.vectors, np.stack([vector("hello world"), vector("hi")]))
        assert embeddings.prompt_tokens == 4 + 3  # with [CLS] and [SEP]
        assert [m.name for m in await services.models.served_models()] == ["embedder", "generator"]
        await services.close()

    asyncio.run(scenario())
    [call] = pool.generations
    assert call.prompt == "Once upon" and call.messages is None and call.params.max_tokens == 5


def test_upserts_too_large_for_a_request_run_as_jobs_and_oversized_documents_are_refused(
    tmp_path: Path, minilm_dir: Path
) -> None:
    services, _ = services_and_pool_with(
        tmp_path, minilm_dir, ingest={"inline_max_chunks": 4, "max_document_bytes": 5000}
    )
    long = DocumentIn(id="long", text=" ".join(f"word{i} of a long document" for i in range(150)))
    huge = DocumentIn(id="huge", text="x " * 3000)

    async def scenario() -> tuple[str | None, int, int]:
        await services.start()
        await services.collections.create_collection(CollectionCreate(name="c"))
        with pytest.raises(PayloadTooLargeError, match=r"'huge' has 6000 bytes of text, over the limit of 5000") as e:
            await services.collections.upsert_documents("c", UpsertRequest(documents=[DOCS[0], huge]))
        assert e.value.field == "documents.1.text"
        small = await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS[:2]))
        assert small.job_id is None and small.chunks == 2 and small.revision == 1
        result = await services.collections.upsert_documents("c", UpsertRequest(documents=[long]))
        assert result.job_id is not None and result.revision is None  # a job's documents land later
        job = await services.collections.jobs.wait(result.job_id)
        info = await services.collections.get_collection("c")
        await services.close()
        return result.job_id, job.done, info.chunks

    _, done, chunks = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert done == 1 and chunks > 2 + 4  # the long document's chunks landed, more than fit inline


# -- the cache -------------------------------------------------------------------------------


def test_an_answer_comes_from_the_cache_until_a_document_changes(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    request = query(query="cats purr", top_k=2)
    changed = DocumentIn(id="cats", text="Cats purr loudly and sleep all night.", metadata={"kind": "pet"})

    async def scenario(c: Services) -> list[QueryResponse]:
        first, again = await c.answers.query(request), await c.answers.query(request)
        await c.collections.upsert_documents("c", UpsertRequest(documents=[changed]))
        return [first, again, await c.answers.query(request)]

    first, again, updated = answer(services, scenario)
    assert len(pool.generations) == 2  # the second query was a hit; the write made the third a miss
    assert (again.answer, again.sources, again.usage) == (first.answer, first.sources, first.usage)
    assert again.timings_ms.keys() == {"cache", "total"}
    assert updated.sources[0].text == changed.text


def test_sampling_parameters_never_share_an_entry_and_unseeded_samples_are_never_cached(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    cacheable: list[dict[str, Any]] = [
        {"max_tokens": 64},
        {"max_tokens": 65},
        {"max_tokens": 64, "top_p": 0.5},
        {"max_tokens": 64, "temperature": 0.7, "seed": 1},
        {"max_tokens": 64, "temperature": 0.7, "seed": 2},
    ]
    sampled = {"max_tokens": 64, "temperature": 0.7}

    async def scenario(c: Services) -> CacheStats:
        for sampling in [*cacheable, *cacheable, sampled, sampled]:
            await c.answers.query(query(query="cats purr", sampling=sampling))
        return c.cache.stats()

    stats: CacheStats = answer(services, scenario)
    assert len(pool.generations) == len(cacheable) + 2  # each cacheable one once, the unseeded sample every time
    counts = stats.levels["l1"]["answer"]
    assert (counts.hits, counts.misses, counts.entries) == (5, 5, 5)


def test_identical_concurrent_misses_generate_once(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool

    async def scenario(c: Services) -> tuple[list[QueryResponse], CacheStats]:
        responses = await asyncio.gather(*(c.answers.query(query(query="cats purr")) for _ in range(8)))
        return responses, c.cache.stats()

    responses, stats = answer(services, scenario)
    assert len(pool.generations) == 1
    assert all(r.answer == "Cats purr [1]." and r.sources == responses[0].sources for r in responses)
    assert stats.coalesced["answer"] + stats.levels["l1"]["answer"].hits == 7


def test_reingesting_unchanged_text_embeds_nothing(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    changed = DocumentIn(id="tea", text="Black tea is brewed with boiling water.")

    async def scenario(c: Services) -> list[list[str]]:
        before = len(pool.embedded)
        await c.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        await c.collections.upsert_documents("c", UpsertRequest(documents=[DOCS[0], changed]))
        return pool.embedded[before:]

    assert answer(services, scenario) == [[changed.text]]


def test_searches_are_cached_bypassed_on_request_and_never_cached_degraded(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    request = SearchRequest(collection="c", query="green tea", top_k=2)

    async def scenario(c: Services) -> tuple[list[SearchResponse], list[list[str]], CacheStats]:
        before = len(pool.embedded)
        responses = [
            await c.search.search(request),
            await c.search.search(request),
            await c.search.search(request.model_copy(update={"use_cache": False})),
            await c.search.search(request.model_copy(update={"top_k": 3})),
        ]
        embedded = pool.embedded[before:]
        pool.embedder_up = False
        for _ in range(2):
            responses.append(await c.search.search(SearchRequest(collection="c", query="sleep all day")))
        return responses, embedded, c.cache.stats()

    (first, hit, fresh, deeper, *degraded), embedded, stats = answer(services, scenario)
    assert hit.hits == first.hits and hit.timings_ms.keys() == {"cache", "total"}
    assert fresh.hits == first.hits and "search" in fresh.timings_ms
    assert len(deeper.hits) == 3 and embedded == [["green tea"]]  # the query's vector came from the cache too
    assert all(d.degraded == ["embed"] for d in degraded)
    counts = stats.levels["l1"]["search"]
    assert (counts.hits, counts.misses, counts.entries) == (1, 4, 2)


SEARCH = {"collection": "c", "query": "cats purr"}
# Each changes the result of a search, and so its key (and that of an answer with the same fields).
SEARCH_VARIANTS: list[dict[str, Any]] = [
    {"collection": "d"},
    {"query": "cats purr!"},
    {"top_k": 3},
    {"mode": "dense"},
    {"mode": "sparse"},
    {"filters": {"field": "kind", "op": "eq", "value": "pet"}},
    {"filters": {"field": "kind", "op": "eq", "value": "drink"}},
    {"filters": {"or": [{"field": "kind", "op": "eq", "value": "pet"}]}},
    {"rerank": True},
    {"rerank": True, "rerank_top_n": 10},
    {"mmr": {"lambda": 0.5}},
    {"mmr": {"lambda": 0.7}},
]
SAMPLING_VARIANTS: list[dict[str, Any]] = [
    {"max_tokens": 64},
    {"max_tokens": None},
    {"temperature": 0.5, "seed": 1},
    {"temperature": 0.5, "seed": 2},
    {"temperature": 0.8, "seed": 1},
    {"seed": 1},
    {"top_p": 0.9},
    {"top_k": 40},
    {"stop": ["\n"]},
    {"repetition_penalty": 1.2},
]


def test_keys_differ_for_every_parameter_that_changes_a_result(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    base_sampling = {"max_tokens": 256}

    def search_request(**fields: Any) -> SearchRequest:
        return SearchRequest.model_validate(SEARCH | fields)

    def query_request(sampling: dict[str, Any] | None = None, **fields: Any) -> QueryRequest:
        return QueryRequest.model_validate(SEARCH | {"top_k": 10} | fields | {"sampling": sampling or base_sampling})

    async def scenario(c: Services) -> None:
        keys = Keys("tritonrag", c.registry, c.models, IndexSettings(), QuerySettings())
        await c.collections.create_collection(CollectionCreate(name="d"))
        searches = [await keys.search(search_request(**fields)) for fields in [{}, *SEARCH_VARIANTS]]
        grounded = [fields for fields in SEARCH_VARIANTS if fields.keys() <= Grounding.model_fields.keys()]
        answers = [await keys.answer(query_request(**fields)) for fields in [{}, *grounded]]
        answers += [await keys.answer(query_request(base_sampling | s)) for s in SAMPLING_VARIANTS]
        assert len(set(searches)) == len(searches) and len(set(answers)) == len(answers)
        # What changes nothing shares the entry.
        assert await keys.search(search_request(use_cache=False, min_revision=0)) == searches[0]
        assert await keys.answer(query_request(use_cache=False, stream=True, min_revision=0)) == answers[0]
        # A write, a new collection of the same name (its revision counts from 0 again), a new model version.
        await c.collections.upsert_documents("d", UpsertRequest(documents=DOCS[:1]))
        assert await keys.search(search_request(collection="d")) != searches[1]
        await c.collections.delete_collection("d")
        await c.collections.create_collection(CollectionCreate(name="d"))
        assert await keys.search(search_request(collection="d")) != searches[1]
        pool.versions["generator"] = "2"
        assert await keys.search(search_request()) == searches[0]  # a search involves no generator
        assert await keys.answer(query_request()) != answers[0]
        pool.versions["reranker"] = "2"
        assert await keys.search(search_request()) == searches[0]
        assert await keys.search(search_request(rerank=True)) != searches[SEARCH_VARIANTS.index({"rerank": True}) + 1]
        pool.versions["embedder"] = "2"
        assert await keys.search(search_request()) != searches[0]
        sparse = SEARCH_VARIANTS.index({"mode": "sparse"}) + 1
        assert await keys.search(search_request(mode="sparse")) == searches[sparse]

    answer(services, scenario)


def test_grounded_greedy_chats_are_replayed_from_the_cache_delta_by_delta(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, pool = services_and_pool
    messages = [ChatMessage(role="user", content="green tea?")]
    grounding = Grounding(collection="c", top_k=1, mode="sparse")

    async def chat(c: Services, params: SamplingParams) -> tuple[list[str], list[GenerationDelta]]:
        sources, deltas = await c.answers.chat(messages, params, grounding)
        return [s.doc_id for s in sources], [d async for d in deltas]

    async def scenario(c: Services) -> list[tuple[list[str], list[GenerationDelta]]]:
        greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0)
        return [await chat(c, greedy), await chat(c, greedy), await chat(c, sampled), await chat(c, sampled)]

    (sources, deltas), (replayed_sources, replayed), *_ = answer(services, scenario)
    assert len(pool.generations) == 3  # the sampled chat, twice
    assert replayed_sources == sources == ["tea"]
    assert replayed == deltas and len(deltas) > 1


def test_the_cache_over_http(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, pool = services_and_pool
    levels: list[str | None] = []
    app = services.http_app(Settings(), Admission(LimitsSettings()), open_guard())

    async def observed(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)
        if scope["type"] == "http" and scope["path"] in ("/v1/search", "/v1/query", "/v1/chat/completions"):
            levels.append(scope["state"].get("cache"))

    search = {"collection": "c", "query": "cats purr"}
    with TestClient(observed) as client:
        client.post("/v1/collections", json={"name": "c"})
        client.post("/v1/collections/c/documents", json={"documents": [d.model_dump() for d in DOCS]})
        assert client.post("/v1/search", json=search).json() == client.post("/v1/search", json=search).json() | {
            "timings_ms": ANY
        }
        client.post("/v1/search", json=search, headers={"cache-control": "no-cache"})
        client.post("/v1/search", json=search | {"use_cache": False})
        client.post("/v1/query", json=search)
        assert "event: done" in client.post("/v1/query", json=search | {"stream": True}).text
        chat = {"model": "generator", "messages": [{"role": "user", "content": "cats?"}], "temperature": 0}
        for body in (chat, chat | {"tritonrag": {"collection": "c"}}, chat | {"tritonrag": {"collection": "c"}}):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        stats = CacheStats.model_validate(client.get("/v1/cache/stats").json())
        flushed = client.post("/v1/cache:flush").json()
        client.post("/v1/search", json=search)
    asyncio.run(services.close())
    assert levels == ["miss", "l1", None, None, "miss", "l1", None, "miss", "l1", "miss"]
    assert stats.redis is False and stats.levels.keys() == {"l1"}
    assert [stats.levels["l1"][tier].hits for tier in ("search", "answer", "chat")] == [1, 1, 1]
    assert flushed == {"l1": sum(counts.entries or 0 for counts in stats.levels["l1"].values()), "l2": None}
    assert len(pool.generations) == 3  # the answer once, the ungrounded chat, the grounded chat once


# -- read-your-writes ------------------------------------------------------------------------


def another_replicas_write(services: Services, document: DocumentIn) -> None:
    """Commit ``document`` to collection "c"'s store as another replica would: not in this replica's indexes."""

    async def collection_store() -> tuple[Path, ModelVersion | None]:
        collection = await services.registry.get("c")
        return collection.directory / STORE_FILE, collection.embedder

    path, embedder = asyncio.run(collection_store())
    store = DocumentStore(sqlite_database(path), DIMENSION)
    chunk = ChunkSpan(document.text, 0, len(document.text))
    store.upsert([PreparedDocument(document, [chunk], vector(document.text)[None])], embedder=embedder)
    store.close()


def test_writes_return_their_revision_and_a_search_follows_the_store_to_min_revision(
    services_and_pool: tuple[Services, StandInPool],
) -> None:
    services, _ = services_and_pool
    owl = DocumentIn(id="owl", text="Owls hunt at night.")
    search = SearchRequest(collection="c", query="owls hunt at night", mode="sparse", top_k=1)

    async def write() -> list[int | None]:
        await services.collections.create_collection(CollectionCreate(name="c"))
        revisions = []
        for document in DOCS[:2]:
            upserted = await services.collections.upsert_documents("c", UpsertRequest(documents=[document]))
            revisions.append(upserted.revision)
        stale = await services.search.search(search)
        assert [hit.doc_id for hit in stale.hits] != ["owl"]
        return revisions

    async def read() -> tuple[SearchResponse, QueryResponse]:
        found = await services.search.search(search.model_copy(update={"min_revision": 3}))
        answered = await services.answers.query(query(top_k=1, query="owls hunt at night", min_revision=3))
        for request in (search.model_copy(update={"min_revision": 4}), query(query="owls", min_revision=4)):
            with pytest.raises(
                InvalidArgumentError, match="min_revision 4 is ahead of the collection's revision 3"
            ) as e:
                if isinstance(request, SearchRequest):
                    await services.search.search(request)
                else:
                    await services.answers.query(request)
            assert e.value.field == "min_revision"
        await services.close()
        return found, answered

    assert asyncio.run(write()) == [1, 2]
    another_replicas_write(services, owl)  # revision 3, which this replica's indexes have not seen
    found, answered = asyncio.run(read())
    assert [hit.doc_id for hit in found.hits] == ["owl"]  # followed the store's log up to min_revision, not cached
    assert [source.doc_id for source in answered.sources] == ["owl"]


def test_read_your_writes_over_http(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, _ = services_and_pool
    app = services.http_app(Settings(), Admission(LimitsSettings()), open_guard())
    search = {"collection": "c", "query": "cats purr"}
    with TestClient(app) as client:
        client.post("/v1/collections", json={"name": "c"})
        revisions = [
            client.post("/v1/collections/c/documents", json={"documents": [d.model_dump()]}).json()["revision"]
            for d in DOCS
        ]
        drink = {"filters": {"field": "kind", "op": "eq", "value": "drink"}}
        deleted = client.post("/v1/collections/c/documents:delete", json=drink).json()
        found = client.post("/v1/search", json=search | {"min_revision": 4})
        ahead = [client.post(path, json=search | {"min_revision": 5}) for path in ("/v1/search", "/v1/query")]
        negative = client.post("/v1/search", json=search | {"min_revision": -1})
    asyncio.run(services.close())
    assert revisions == [1, 2, 3] and deleted == {"deleted": 1, "revision": 4}
    assert found.status_code == 200 and found.json()["hits"][0]["doc_id"] == "cats"
    for response in ahead:
        assert response.status_code == 422
        assert response.json()["error"] == {
            "code": "INVALID_ARGUMENT",
            "message": "min_revision 5 is ahead of the collection's revision 4",
            "field": "min_revision",
        }
    assert negative.status_code == 422 and negative.json()["error"]["field"] == "min_revision"


def test_read_your_writes_over_grpc(services_and_pool: tuple[Services, StandInPool]) -> None:
    services, _ = services_and_pool

    async def scenario() -> None:
        async with grpc_channel(services.collections, services.search, services.answers) as channel:
            stub = pb_grpc.TritonRagStub(channel)
            await stub.CreateCollection(pb.CreateCollectionRequest(name="c"))
            documents = [pb.DocumentIn(id=d.id, text=d.text) for d in DOCS]
            upserted = await stub.UpsertDocuments(pb.UpsertDocumentsRequest(collection="c", documents=documents))
            assert upserted.HasField("revision") and upserted.revision == 1
            found = await stub.Search(pb.SearchRequest(collection="c", query="cats purr", min_revision=1))
            assert found.hits[0].doc_id == "cats"
            for call in (
                stub.Search(pb.SearchRequest(collection="c", query="cats purr", min_revision=2)),
                stub.Query(pb.QueryRequest(collection="c", query="cats purr", min_revision=2)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details() == "min_revision 2 is ahead of the collection's revision 1"
        await services.close()

    asyncio.run(scenario())

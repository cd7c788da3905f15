"""The one async core behind both front-ends: collections, documents, search, jobs and answers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import (
    ChatMessage,
    Chunking,
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    DeltaEvent,
    Document,
    DocumentIn,
    DoneEvent,
    Embeddings,
    FinishReason,
    GenerationDelta,
    Grounding,
    JobInfo,
    ModelVersion,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchHit,
    SearchMode,
    SearchRequest,
    SearchResponse,
    Source,
    SourcesEvent,
    UpsertRequest,
    UpsertResult,
    Usage,
)
from tritonrag.export.runtime.encoding import ModelTokenizer

from .config import IngestSettings, QuerySettings
from .errors import DeadlineExceededError, InvalidArgumentError, NotFoundError, UnavailableError
from .generation.extractive import NO_PASSAGES_ANSWER, extractive_answer
from .generation.packing import ContextWindow, Packed, pack
from .generation.prompts import cited_numbers, grounded_chat, grounded_messages
from .ingest.chunking import Chunker
from .ingest.jobs import JobRunner
from .retrieval.collection import Collection, PreparedDocument, ScoredChunk, StoredChunk
from .retrieval.fusion import mmr, reciprocal_rank_fusion
from .routing.triton_pool import TritonPool, served_version_dir
from .store.catalog import Catalog

SEARCH_QUERY_CHARS = 4096  # SearchRequest.query's limit: a grounded chat searches with the start of its question


class Timer:
    """Per-stage wall-clock timings in milliseconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str, started: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - started) * 1000.0

    def total(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings


@dataclass
class Candidates:
    """Chunks found for one search, their per-stage scores, and their current order."""

    order: list[int] = field(default_factory=list)
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    chunks: dict[int, StoredChunk] = field(default_factory=dict)
    query_vector: npt.NDArray[np.float32] | None = None
    degraded: list[str] = field(default_factory=list)

    def hits(self, top_k: int) -> list[SearchHit]:
        """The first ``top_k`` in order; ``score`` is the last stage's score (rerank, rrf, dense or sparse)."""
        result = []
        for chunk_id in self.order[:top_k]:
            chunk, scores = self.chunks[chunk_id], self.scores[chunk_id]
            final = next(scores[s] for s in ("rerank", "rrf", "dense", "sparse") if s in scores)
            result.append(
                SearchHit(
                    doc_id=chunk.doc_id,
                    chunk_id=chunk_id,
                    text=chunk.text,
                    start=chunk.start,
                    end=chunk.end,
                    metadata=chunk.metadata,
                    score=final,
                    scores=scores,
                )
            )
        return result


class RagCore:
    """Use cases of the orchestrator. Store and index calls run in worker threads."""

    def __init__(
        self,
        data_dir: Path,
        repository: Path,
        catalog: Catalog,
        pool: TritonPool,
        ingest: IngestSettings,
        embedder_model: str = "embedder",
        *,
        reranker_model: str = "reranker",
        generator_model: str = "generator",
        fallback_generator_model: str | None = None,
        query: QuerySettings | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._repository = repository
        self._catalog = catalog
        self._pool = pool
        self._inline_max = ingest.inline_max_documents
        self._embedder = embedder_model
        self._reranker = reranker_model
        self._generator = generator_model
        self._fallback_generator = fallback_generator_model
        self._query = query or QuerySettings()
        self._collections: dict[str, Collection] = {}
        self._open_lock = asyncio.Lock()
        self._dimension: int | None = None
        self._chunkers: dict[tuple[str, int, int], Chunker] = {}
        self._embedder_tokenizers: dict[str, ModelTokenizer] = {}
        self._windows: dict[str, ContextWindow] = {}
        self.jobs = JobRunner(catalog, self._upsert_now, data_dir / "jobs", ingest)

    async def start(self) -> None:
        """Resume unfinished ingestion jobs."""
        await self.jobs.start()

    async def _chunker(self, chunking: Chunking) -> Chunker:
        """A chunker on the tokenizer of the embedder version Triton serves now."""
        version = await self._pool.model_version(self._embedder)
        key = (version.version, chunking.chunk_tokens, chunking.overlap_tokens)
        if key not in self._chunkers:
            version_dir = served_version_dir(self._repository, version)
            self._chunkers[key] = Chunker.from_version_dir(version_dir, chunking.chunk_tokens, chunking.overlap_tokens)
        return self._chunkers[key]

    # -- collections -------------------------------------------------------------------------

    async def _embedding_dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int((await self._pool.embed(["dimension probe"])).shape[1])
        return self._dimension

    def _collection_dir(self, name: str) -> Path:
        return self._data_dir / "collections" / name

    async def _collection(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is not None:
            return collection
        async with self._open_lock:
            if name not in self._collections:
                spec = await asyncio.to_thread(self._catalog.get_collection, name)
                # An existing collection opens without Triton, so BM25 search works while the embedder is down.
                stored = await asyncio.to_thread(Collection.stored_dimension, self._collection_dir(name))
                dimension = stored if stored is not None else await self._embedding_dimension()
                self._collections[name] = await asyncio.to_thread(
                    Collection.open, self._collection_dir(name), spec, dimension
                )
            return self._collections[name]

    async def _info(self, collection: Collection) -> CollectionInfo:
        stats = await asyncio.to_thread(collection.info)
        created_at = await asyncio.to_thread(self._catalog.collection_created_at, collection.name)
        try:
            embedder = await self._pool.model_version(self._embedder)
        except UnavailableError:
            embedder = None
        return CollectionInfo(
            name=collection.name,
            chunking=collection.spec.chunking,
            index_type=collection.spec.index_type,
            active_index=stats.active_index,
            documents=stats.documents,
            chunks=stats.chunks,
            size_bytes=stats.size_bytes,
            revision=stats.revision,
            embedder=embedder,
            created_at=created_at,
        )

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        """Create an empty collection; AlreadyExistsError when the name is taken."""
        await asyncio.to_thread(self._catalog.create_collection, request)
        return await self._info(await self._collection(request.name))

    async def list_collections(self) -> list[CollectionInfo]:
        names = await asyncio.to_thread(self._catalog.list_collections)
        return [await self._info(await self._collection(name)) for name in names]

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self._info(await self._collection(name))

    async def delete_collection(self, name: str) -> None:
        """Delete a collection and its files; NotFoundError when it does not exist."""
        collection = await self._collection(name)
        async with self._open_lock:
            self._collections.pop(name, None)
            await asyncio.to_thread(collection.close)
            await asyncio.to_thread(self._catalog.delete_collection, name)
            await asyncio.to_thread(shutil.rmtree, self._collection_dir(name), True)

    # -- documents ---------------------------------------------------------------------------

    async def _prepare(self, collection: Collection, documents: Sequence[DocumentIn]) -> list[PreparedDocument]:
        chunker = await self._chunker(collection.spec.chunking)
        spans = [chunker.chunk(doc.text) for doc in documents]
        texts = [span.text for doc_spans in spans for span in doc_spans]
        vectors = await self._pool.embed(texts)
        prepared, start = [], 0
        for doc, doc_spans in zip(documents, spans, strict=True):
            prepared.append(PreparedDocument(doc, doc_spans, vectors[start : start + len(doc_spans)]))
            start += len(doc_spans)
        return prepared

    async def _upsert_now(self, collection_name: str, documents: Sequence[DocumentIn]) -> int:
        """Chunk, embed and store ``documents``; returns the number of chunks written."""
        collection = await self._collection(collection_name)
        prepared = await self._prepare(collection, documents)
        await asyncio.to_thread(collection.upsert, prepared)
        return sum(len(p.chunks) for p in prepared)

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        """Upsert inline, or as a job when the batch is large."""
        await self._collection(collection)
        if len(request.documents) > self._inline_max:
            job_id = await self.jobs.submit(collection, request.documents)
            return UpsertResult(collection=collection, documents=len(request.documents), chunks=0, job_id=job_id)
        chunks = await self._upsert_now(collection, request.documents)
        return UpsertResult(collection=collection, documents=len(request.documents), chunks=chunks)

    async def get_document(self, collection: str, doc_id: str) -> Document:
        return await asyncio.to_thread((await self._collection(collection)).get, doc_id)

    async def delete_document(self, collection: str, doc_id: str) -> None:
        """Delete one document; NotFoundError when it does not exist."""
        removed = await asyncio.to_thread((await self._collection(collection)).delete, [doc_id])
        if removed == 0:
            raise NotFoundError(f"document {doc_id!r} not found in collection {collection!r}")

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> int:
        return await asyncio.to_thread((await self._collection(collection)).delete_by_filter, request.filters)

    async def get_job(self, job_id: str) -> JobInfo:
        return await self.jobs.get(job_id)

    # -- search ------------------------------------------------------------------------------

    async def search(self, request: SearchRequest) -> SearchResponse:
        """Retrieve (dense, sparse or hybrid), optionally rerank and diversify, and return the top k."""
        timer = Timer()
        found = await self._find(request, timer)
        return SearchResponse(
            collection=request.collection,
            hits=found.hits(request.top_k),
            timings_ms=timer.total(),
            degraded=found.degraded,
        )

    async def _find(self, request: SearchRequest, timer: Timer, request_id: str | None = None) -> Candidates:
        """The candidates of a search in their final order: retrieved, then reranked and diversified if asked."""
        collection = await self._collection(request.collection)
        depth = max(request.top_k, request.rerank_top_n if request.rerank else 0)
        if request.mmr is not None:
            depth = max(depth, 4 * request.top_k)
        found = await self._retrieve(collection, request, depth, timer, request_id)
        if request.rerank and found.order:
            started = time.perf_counter()
            await self._rerank(request.query, found, request.rerank_top_n, request_id)
            timer.stage("rerank", started)
        if request.mmr is not None and found.query_vector is not None and found.order:
            started = time.perf_counter()
            vectors = np.stack([found.chunks[c].vector for c in found.order])
            found.order = mmr(found.query_vector, vectors, found.order, request.mmr.lambda_, request.top_k)
            timer.stage("mmr", started)
        return found

    async def _retrieve(
        self, collection: Collection, request: SearchRequest, depth: int, timer: Timer, request_id: str | None
    ) -> Candidates:
        """Dense and/or BM25 top-``depth`` (fused by RRF when both); BM25 alone when the embedder is down."""
        found = Candidates()
        mode = request.mode
        if mode != SearchMode.sparse:
            started = time.perf_counter()
            try:
                found.query_vector = (await self._pool.embed([request.query], request_id=request_id))[0]
            except (UnavailableError, DeadlineExceededError):
                found.degraded.append("embed")
                mode = SearchMode.sparse
            timer.stage("embed", started)
        started = time.perf_counter()
        rankings: dict[str, list[ScoredChunk]] = {}
        if found.query_vector is not None:
            rankings["dense"] = await asyncio.to_thread(
                collection.search_dense, found.query_vector, depth, request.filters
            )
        if mode != SearchMode.dense:
            rankings["sparse"] = await asyncio.to_thread(
                collection.search_sparse, request.query, depth, request.filters
            )
        for stage, ranking in rankings.items():
            for hit in ranking:
                found.scores.setdefault(hit.chunk_id, {})[stage] = hit.score
        if len(rankings) == 2:
            fused = reciprocal_rank_fusion([[h.chunk_id for h in r] for r in rankings.values()])[:depth]
            for chunk_id, score in fused:
                found.scores[chunk_id]["rrf"] = score
            order = [chunk_id for chunk_id, _ in fused]
        else:
            order = [h.chunk_id for h in next(iter(rankings.values()))]
        found.chunks = {c.chunk_id: c for c in await asyncio.to_thread(collection.chunks, order)}
        found.order = [chunk_id for chunk_id in order if chunk_id in found.chunks]
        timer.stage("search", started)
        return found

    async def _rerank(self, query: str, found: Candidates, top_n: int, request_id: str | None) -> None:
        """Order the first ``top_n`` candidates by the reranker; leave the order as is when it is down."""
        candidates = found.order[:top_n]
        try:
            scores = await self._pool.rerank(query, [found.chunks[c].text for c in candidates], request_id=request_id)
        except (UnavailableError, DeadlineExceededError):
            found.degraded.append("rerank")
            return
        for chunk_id, score in zip(candidates, scores, strict=True):
            found.scores[chunk_id]["rerank"] = float(score)
        found.order = sorted(candidates, key=lambda c: -found.scores[c]["rerank"])

    # -- answers -----------------------------------------------------------------------------

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """The events of ``query_stream`` gathered into one answer (``gather_answer``)."""
        return await gather_answer(request.collection, self.query_stream(request, request_id))

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        """Retrieve, pack the passages into the generator's window and answer: ``SourcesEvent``, then
        ``DeltaEvent``s as the text is generated, then ``DoneEvent`` (usage, timings, citations used).

        The first event waits for the generator's first token, so that a busy generator
        (``ResourceExhaustedError``) fails the request before anything is sent. No passage to give the
        generator (none found, or none fits): a fixed answer, without generating. Generator down (not
        served, or failing before its first token): the best passage's first sentences, cited, and
        ``degraded`` lists "generate"; a failure after the first token is raised. Closing the stream
        early closes the generation, and Triton cancels it.
        """
        timer = Timer()
        hits, degraded = await self._ground(request, request.query, timer, request_id)
        window = await self._served_window() if hits else None
        packed: Packed | None = None
        if window is not None:
            passages = [h.text for h in hits]
            build = partial(grounded_messages, request.query)
            max_tokens, default = request.sampling.max_tokens, self._query.default_max_tokens
            packed = await asyncio.to_thread(pack, window, build, passages, max_tokens, default)
        kept = packed.kept if packed is not None else list(range(len(hits)))
        sources = [_source(citation, hits[i]) for citation, i in enumerate(kept, start=1)]
        started = time.perf_counter()
        deltas = self._answer(sources, window, packed, request.sampling, request_id, degraded)
        text: list[str] = []
        usage, finish_reason = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), FinishReason.stop
        async with contextlib.aclosing(deltas):
            delta: GenerationDelta | None = await anext(deltas)
            yield SourcesEvent(sources=sources, dropped_passages=len(hits) - len(kept), degraded=list(degraded))
            while delta is not None:
                if delta.text:
                    text.append(delta.text)
                    yield DeltaEvent(text=delta.text)
                if delta.finish_reason is not None:
                    finish_reason, usage = delta.finish_reason, _usage(delta)
                delta = await anext(deltas, None)
        if sources and packed is not None:
            timer.stage("generate", started)
        yield DoneEvent(
            usage=usage,
            finish_reason=finish_reason,
            timings_ms=timer.total(),
            cited=cited_numbers("".join(text), len(sources)),
            degraded=degraded,
        )

    async def _answer(
        self,
        sources: Sequence[Source],
        window: ContextWindow | None,
        packed: Packed | None,
        params: SamplingParams,
        request_id: str | None,
        degraded: list[str],
    ) -> AsyncGenerator[GenerationDelta]:
        """The answer's deltas: from the generator, else from the fallback generator, else one delta with the
        fixed or the extractive answer (then "generate" is appended to ``degraded``)."""
        if not sources:
            yield GenerationDelta(text=NO_PASSAGES_ANSWER, finish_reason=FinishReason.stop)
            return
        models = [self._generator, *([self._fallback_generator] if self._fallback_generator else [])]
        for model in models if window is not None and packed is not None else []:
            assert window is not None and packed is not None  # for the type checker: the loop runs only then
            async with contextlib.aclosing(self._generate(window, packed, params, request_id, model)) as stream:
                try:
                    first = await anext(stream)
                except (UnavailableError, DeadlineExceededError):
                    if "generate" not in degraded:
                        degraded.append("generate")
                    continue
                yield first
                async for delta in stream:
                    yield delta
                return
        if "generate" not in degraded:
            degraded.append("generate")
        yield GenerationDelta(text=extractive_answer(sources[0].text), finish_reason=FinishReason.stop)

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]:
        """The generator's stream over ``messages``; with ``grounding``, first a retrieval with the last user
        message, whose passages (those that fit, numbered from 1) go into the prompt and come back as sources.

        Grounded, ``max_tokens`` None is ``query.default_max_tokens`` capped by the window; the generator must
        be served (``UnavailableError``), as there is no answer to fall back to.
        """
        if grounding is None:
            return [], self._pool.generate(params, messages=messages, request_id=request_id)
        question = next((m.content for m in reversed(messages) if m.role == "user"), "").strip()
        if not question:
            raise InvalidArgumentError("a grounded chat needs a last user message with text", field="messages")
        hits, _ = await self._ground(grounding, question[:SEARCH_QUERY_CHARS], Timer(), request_id)
        window = await self._context_window()
        build = partial(grounded_chat, messages)
        passages, default = [h.text for h in hits], self._query.default_max_tokens
        packed = await asyncio.to_thread(pack, window, build, passages, params.max_tokens, default, "max_tokens")
        sources = [_source(citation, hits[i]) for citation, i in enumerate(packed.kept, start=1)]
        return sources, self._generate(window, packed, params, request_id)

    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        """The generator's stream for a raw ``prompt``; ``max_tokens`` None: as many as the window leaves."""
        return self._pool.generate(params, prompt=prompt, request_id=request_id)

    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings:
        """Vectors of ``texts`` from the embedder Triton serves, and the tokens it read (truncated as it does)."""
        version = await self._pool.model_version(self._embedder)
        vectors = await self._pool.embed(texts, request_id=request_id)
        if version.version not in self._embedder_tokenizers:
            version_dir = served_version_dir(self._repository, version)
            tokenizer = await asyncio.to_thread(ModelTokenizer.from_version_dir, version_dir)
            self._embedder_tokenizers[version.version] = tokenizer
        tokenizer = self._embedder_tokenizers[version.version]
        tokens = sum(len(tokenizer.encode_text(text).ids) for text in texts)
        return Embeddings(model=version, vectors=vectors.tolist(), prompt_tokens=tokens)

    async def served_models(self) -> list[ModelVersion]:
        """The version of each model (embedder, reranker, generator) that Triton serves ready now."""
        served = []
        for name in (self._embedder, self._reranker, self._generator):
            with contextlib.suppress(UnavailableError):
                served.append(await self._pool.model_version(name))
        return served

    async def _ground(
        self, grounding: Grounding, query: str, timer: Timer, request_id: str | None
    ) -> tuple[list[SearchHit], list[str]]:
        """The passages a grounded answer offers the generator, best first, and the degraded retrieval stages."""
        request = SearchRequest(
            collection=grounding.collection,
            query=query,
            top_k=grounding.top_k,
            mode=grounding.mode,
            filters=grounding.filters,
            rerank=grounding.rerank,
        )
        found = await self._find(request, timer, request_id)
        return found.hits(grounding.top_k), found.degraded

    async def _context_window(self) -> ContextWindow:
        """The context window of the generator version Triton serves now; ``UnavailableError`` when none is."""
        version = await self._pool.model_version(self._generator)
        if version.version not in self._windows:
            version_dir = served_version_dir(self._repository, version)
            self._windows[version.version] = await asyncio.to_thread(ContextWindow.from_version_dir, version_dir)
        return self._windows[version.version]

    async def _served_window(self) -> ContextWindow | None:
        """``_context_window``, or None when no endpoint serves the generator."""
        try:
            return await self._context_window()
        except UnavailableError:
            return None

    def _generate(
        self,
        window: ContextWindow,
        packed: Packed,
        params: SamplingParams,
        request_id: str | None,
        model: str | None = None,
    ) -> AsyncGenerator[GenerationDelta]:
        """``model``'s (default: the generator's) stream for a packed prompt: chat messages, or the rendered text
        for a model without a chat template."""
        params = params.model_copy(update={"max_tokens": packed.max_tokens})
        if window.template is None:
            prompt = window.render(packed.messages)
            return self._pool.generate(params, prompt=prompt, request_id=request_id, model=model)
        return self._pool.generate(params, messages=packed.messages, request_id=request_id, model=model)

    # -- lifecycle ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        """Whether Triton answers and the catalog opens."""
        stores = await asyncio.to_thread(self._catalog.healthy)
        return {"triton": await self._pool.ready(), "stores": stores}

    async def close(self) -> None:
        """Stop jobs and close every open collection (writing index snapshots)."""
        await self.jobs.close()
        for collection in self._collections.values():
            await asyncio.to_thread(collection.close)
        self._collections.clear()


async def gather_answer(collection: str, events: AsyncGenerator[QueryEvent]) -> QueryResponse:
    """A streamed answer (``SourcesEvent``, ``DeltaEvent``s, ``DoneEvent``) as one response; ``Source.cited``
    marks the passages the answer cites. The stream is closed however this ends."""
    sources: SourcesEvent | None = None
    answer: list[str] = []
    done: DoneEvent | None = None
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, SourcesEvent):
                sources = event
            elif isinstance(event, DeltaEvent):
                answer.append(event.text)
            else:
                done = event
    if sources is None or done is None:
        raise ValueError("an answer stream must send its sources and its done event")
    cited = set(done.cited)
    return QueryResponse(
        collection=collection,
        answer="".join(answer),
        sources=[s.model_copy(update={"cited": s.citation in cited}) for s in sources.sources],
        dropped_passages=sources.dropped_passages,
        usage=done.usage,
        finish_reason=done.finish_reason,
        timings_ms=done.timings_ms,
        degraded=done.degraded,
    )


def _source(citation: int, hit: SearchHit) -> Source:
    return Source(
        citation=citation,
        doc_id=hit.doc_id,
        chunk_id=hit.chunk_id,
        text=hit.text,
        start=hit.start,
        end=hit.end,
        metadata=hit.metadata,
        score=hit.score,
    )


def _usage(delta: GenerationDelta) -> Usage:
    """The token counts of a generation's last delta."""
    return Usage(
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
    )

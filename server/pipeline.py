"""The one async core behind both front-ends: collections, documents, search and jobs."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .config import IngestSettings
from .errors import DeadlineExceededError, NotFoundError, UnavailableError
from .ingest.chunking import Chunker
from .ingest.jobs import JobRunner
from .retrieval.collection import Collection, PreparedDocument, ScoredChunk, StoredChunk
from .retrieval.fusion import mmr, reciprocal_rank_fusion
from .routing.triton_pool import TritonPool, served_version_dir
from .schema import (
    Chunking,
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    Document,
    DocumentIn,
    JobInfo,
    SearchHit,
    SearchMode,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResult,
)
from .store.catalog import Catalog


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
    ) -> None:
        self._data_dir = data_dir
        self._repository = repository
        self._catalog = catalog
        self._pool = pool
        self._inline_max = ingest.inline_max_documents
        self._embedder = embedder_model
        self._collections: dict[str, Collection] = {}
        self._open_lock = asyncio.Lock()
        self._dimension: int | None = None
        self._chunkers: dict[tuple[str, int, int], Chunker] = {}
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
            generation=stats.generation,
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
        collection = await self._collection(request.collection)
        depth = max(request.top_k, request.rerank_top_n if request.rerank else 0)
        if request.mmr is not None:
            depth = max(depth, 4 * request.top_k)
        found = await self._retrieve(collection, request, depth, timer)
        if request.rerank and found.order:
            started = time.perf_counter()
            await self._rerank(request.query, found, request.rerank_top_n)
            timer.stage("rerank", started)
        if request.mmr is not None and found.query_vector is not None and found.order:
            started = time.perf_counter()
            vectors = np.stack([found.chunks[c].vector for c in found.order])
            found.order = mmr(found.query_vector, vectors, found.order, request.mmr.lambda_, request.top_k)
            timer.stage("mmr", started)
        return SearchResponse(
            collection=request.collection,
            hits=found.hits(request.top_k),
            timings_ms=timer.total(),
            degraded=found.degraded,
        )

    async def _retrieve(self, collection: Collection, request: SearchRequest, depth: int, timer: Timer) -> Candidates:
        """Dense and/or BM25 top-``depth`` (fused by RRF when both); BM25 alone when the embedder is down."""
        found = Candidates()
        mode = request.mode
        if mode != SearchMode.sparse:
            started = time.perf_counter()
            try:
                found.query_vector = (await self._pool.embed([request.query]))[0]
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

    async def _rerank(self, query: str, found: Candidates, top_n: int) -> None:
        """Order the first ``top_n`` candidates by the reranker; leave the order as is when it is down."""
        candidates = found.order[:top_n]
        try:
            scores = await self._pool.rerank(query, [found.chunks[c].text for c in candidates])
        except (UnavailableError, DeadlineExceededError):
            found.degraded.append("rerank")
            return
        for chunk_id, score in zip(candidates, scores, strict=True):
            found.scores[chunk_id]["rerank"] = float(score)
        found.order = sorted(candidates, key=lambda c: -found.scores[c]["rerank"])

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

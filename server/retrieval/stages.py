"""The stages of a search, each a small object with one ``run`` method: embed → dense / sparse → fuse → rerank → MMR.

``SearchService`` chains them; a cache or a metric wraps one stage without touching the others.
Stages that call Triton raise its errors (``UnavailableError``, ``DeadlineExceededError``); the
service decides what degrades.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import Filter, GroupBy, SearchHit

from ..routing.triton_pool import TritonPool
from .collection import Collection, ScoredChunk, StoredChunk
from .fusion import mmr, reciprocal_rank_fusion

Vectors = npt.NDArray[np.float32]


class Embedding:
    """Texts → L2-normalised vectors, by the embedder in Triton (queries, and chunks at ingestion)."""

    def __init__(self, pool: TritonPool) -> None:
        self._pool = pool

    async def run(self, texts: Sequence[str], request_id: str | None = None, *, bulk: bool = False) -> Vectors:
        """``[len(texts), dimension]`` float32, in the order of ``texts``; ``bulk`` (ingestion) yields to searches."""
        return await self._pool.embed(texts, request_id=request_id, bulk=bulk)


class DenseRetrieval:
    """The chunks nearest a query vector in the collection's FAISS index, filters applied before the cut."""

    async def run(
        self, collection: Collection, vector: npt.NDArray[np.float32], depth: int, filters: Filter | None
    ) -> list[ScoredChunk]:
        return await asyncio.to_thread(collection.search_dense, vector, depth, filters)


class SparseRetrieval:
    """The chunks that best match a query's words in the collection's BM25 index, filters applied before the cut."""

    async def run(self, collection: Collection, query: str, depth: int, filters: Filter | None) -> list[ScoredChunk]:
        return await asyncio.to_thread(collection.search_sparse, query, depth, filters)


class Fusion:
    """Rankings → one: reciprocal rank fusion of several, or the one as it is."""

    def __init__(self, k: int = 60) -> None:
        self.k = k

    def run(self, rankings: Sequence[Sequence[ScoredChunk]], depth: int) -> list[ScoredChunk]:
        """The fused top ``depth``; with one ranking, that ranking."""
        if len(rankings) == 1:
            return list(rankings[0])
        fused = reciprocal_rank_fusion([[hit.chunk_id for hit in ranking] for ranking in rankings], self.k)
        return [ScoredChunk(chunk_id, score) for chunk_id, score in fused[:depth]]


class Reranking:
    """(query, passages) → one relevance score per passage, by the reranker in Triton."""

    def __init__(self, pool: TritonPool) -> None:
        self._pool = pool

    async def run(self, query: str, passages: Sequence[str], request_id: str | None = None) -> Vectors:
        """float32 ``[len(passages)]``; higher is more relevant."""
        return await self._pool.rerank(query, passages, request_id=request_id)


class Diversification:
    """Candidates → the ``top_k`` that balance relevance and novelty (maximal marginal relevance)."""

    def run(
        self, query_vector: Vectors, vectors: Vectors, order: Sequence[int], lambda_: float, top_k: int
    ) -> list[int]:
        return mmr(query_vector, vectors, order, lambda_, top_k)


@dataclass(frozen=True)
class SearchStages:
    """The stages ``SearchService`` chains."""

    embedding: Embedding
    dense: DenseRetrieval
    sparse: SparseRetrieval
    fusion: Fusion
    reranking: Reranking
    diversification: Diversification

    @classmethod
    def over(cls, pool: TritonPool) -> SearchStages:
        """Every stage, calling Triton through ``pool``."""
        return cls(Embedding(pool), DenseRetrieval(), SparseRetrieval(), Fusion(), Reranking(pool), Diversification())


@dataclass
class Candidates:
    """Chunks found for one search, their per-stage scores, and their current order."""

    order: list[int] = field(default_factory=list)
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    chunks: dict[int, StoredChunk] = field(default_factory=dict)
    query_vector: Vectors | None = None
    degraded: list[str] = field(default_factory=list)

    def record(self, stage: str, ranking: Sequence[ScoredChunk]) -> None:
        """Note each hit's score under ``stage``."""
        for hit in ranking:
            self.scores.setdefault(hit.chunk_id, {})[stage] = hit.score

    def hits(self, top_k: int, group_by: GroupBy = GroupBy.chunk) -> list[SearchHit]:
        """The first ``top_k`` in order (by document: each document's first chunk, its later ones listed);
        ``score`` is the last stage's score (rerank, rrf, dense or sparse)."""
        result: dict[str | int, SearchHit] = {}
        for chunk_id in self.order:
            chunk = self.chunks[chunk_id]
            group: str | int = chunk.doc_id if group_by is GroupBy.document else chunk_id
            if group in result:
                result[group].other_chunk_ids.append(chunk_id)
            elif len(result) < top_k:
                result[group] = self._hit(chunk_id)
            elif group_by is GroupBy.chunk:
                break
        return list(result.values())

    def _hit(self, chunk_id: int) -> SearchHit:
        chunk, scores = self.chunks[chunk_id], self.scores[chunk_id]
        final = next(scores[s] for s in ("rerank", "rrf", "dense", "sparse") if s in scores)
        return SearchHit(
            doc_id=chunk.doc_id,
            chunk_id=chunk_id,
            text=chunk.text,
            start=chunk.start,
            end=chunk.end,
            metadata=chunk.metadata,
            score=final,
            scores=scores,
        )

"""The stages of a search, each a small object with one ``run`` method: embed → verbatim check → dense / sparse /
document → fuse → rerank → MMR.

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

from tritonrag.clients.wire.schema import Filter, FusionMethod, FusionWeights, GroupBy, SearchHit

from ..routing.triton_pool import TritonPool
from .collection import Collection, ScoredChunk, StoredChunk
from .fusion import mmr, normalised_fusion, reciprocal_rank_fusion

Vectors = npt.NDArray[np.float32]


class Embedding:
    """Texts → L2-normalised vectors, by the embedder in Triton (queries, and chunks at ingestion)."""

    def __init__(self, pool: TritonPool) -> None:
        self._pool = pool

    async def run(
        self, texts: Sequence[str], request_id: str | None = None, *, bulk: bool = False, version: str | None = None
    ) -> Vectors:
        """``[len(texts), dimension]`` float32, in the order of ``texts``, from embedder ``version`` (default: the
        route's stable version); ``bulk`` (ingestion) yields to searches."""
        return await self._pool.embed(texts, request_id=request_id, bulk=bulk, version=version)


class VerbatimCheck:
    """Whether a query is found word for word in the collection (among the chunks the filters allow): such a query
    is fused with its request's ``verbatim`` weights."""

    async def run(self, collection: Collection, query: str, filters: Filter | None) -> bool:
        return await asyncio.to_thread(collection.holds_phrase, query, filters)


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


class DocumentRetrieval:
    """The documents that best match a query's words as whole texts (BM25), given to the candidate chunks:
    each chunk of such a document is ranked with its document's score."""

    async def run(
        self, collection: Collection, query: str, candidates: Sequence[int], depth: int, filters: Filter | None
    ) -> list[ScoredChunk]:
        def ranking() -> list[ScoredChunk]:
            scores = collection.search_documents(query, depth, filters)
            owners = collection.documents_of(candidates) if scores else {}
            ranked = [ScoredChunk(c, scores[owners[c]]) for c in candidates if owners.get(c) in scores]
            return sorted(ranked, key=lambda hit: (-hit.score, hit.chunk_id))

        return await asyncio.to_thread(ranking)


class RankFusion:
    """Rankings → one, by a method and the rankings' weights; one ranking is kept as it is."""

    def __init__(self, k: int = 60) -> None:
        self.k = k

    def run(
        self, rankings: dict[str, list[ScoredChunk]], method: FusionMethod, weights: FusionWeights, depth: int
    ) -> list[ScoredChunk]:
        """The fused top ``depth`` of the rankings named ``dense``, ``sparse`` and ``document``."""
        if len(rankings) == 1:
            return next(iter(rankings.values()))
        lists = list(rankings.values())
        weighting = [getattr(weights, name) for name in rankings]
        if method is FusionMethod.minmax:
            fused = normalised_fusion(lists, weighting, "minmax")
        elif method is FusionMethod.zscore:
            fused = normalised_fusion(lists, weighting, "zscore")
        else:
            fused = reciprocal_rank_fusion(lists, weighting, self.k)
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
    verbatim: VerbatimCheck
    dense: DenseRetrieval
    sparse: SparseRetrieval
    documents: DocumentRetrieval
    fusion: RankFusion
    reranking: Reranking
    diversification: Diversification

    @classmethod
    def over(cls, pool: TritonPool) -> SearchStages:
        """Every stage, calling Triton through ``pool``."""
        return cls(
            Embedding(pool),
            VerbatimCheck(),
            DenseRetrieval(),
            SparseRetrieval(),
            DocumentRetrieval(),
            RankFusion(),
            Reranking(pool),
            Diversification(),
        )


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
        ``score`` is the last stage's score (rerank, fused, dense or sparse)."""
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
        final = next(scores[s] for s in ("rerank", "fused", "dense", "sparse") if s in scores)
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

"""``SearchService``: retrieval over one collection, as a chain of stages with degradation and timings."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from tritonrag.clients.wire.schema import GroupBy, ModelVersion, SearchMode, SearchRequest, SearchResponse

from ..errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from ..retrieval.collection import Collection, ScoredChunk
from ..retrieval.fusion import fuse_reranked
from ..retrieval.registry import CollectionRegistry
from ..retrieval.stages import Candidates, SearchStages
from ..security.injection import flag_hits
from ..telemetry.timing import Timer

_DOWN = (UnavailableError, DeadlineExceededError)
# Grouped by document, a search ranks this many chunks per document asked for: k documents are found
# unless fewer than k appear among them (a few long documents matching everywhere).
DOCUMENT_DEPTH = 5
# Rank constant of the fusion of the reranker's order with the retrieval order (see ``_rerank``).
RERANK_FUSION_K = 60


class SearchService:
    """Dense, sparse (chunk and document BM25) or hybrid retrieval, then reranking and MMR when asked.

    An embedder that cannot answer turns a dense or hybrid search into a BM25 one, and a reranker
    that cannot answer leaves the retrieval order; the response lists the stage in ``degraded``.

    The query is embedded by the version the collection is pinned to (DESIGN §5), never another: while that
    version is not served, the search is a BM25 one as above. A re-index that switches the collection to
    another version during a search makes it retrieve again with the new version, so that the query and the
    vectors it is compared with always come from one version.
    """

    def __init__(self, registry: CollectionRegistry, stages: SearchStages) -> None:
        self._registry = registry
        self._stages = stages

    async def catch_up(self, collection: str, min_revision: int | None) -> None:
        """Bring ``collection``'s indexes to ``min_revision`` (the revision a write returned, through any replica)
        when they are behind it, following the store's revision log (`Collection.follow`). The cache layer calls
        it for every search and answer, before it looks up a result (its key holds the revision searches see).
        ``InvalidArgumentError`` when the store itself has not got that revision."""
        if min_revision is None:
            return
        target = await self._registry.get(collection)
        if target.revision >= min_revision:
            return
        revision = await asyncio.to_thread(target.follow, min_revision)
        if revision < min_revision:
            raise InvalidArgumentError(
                f"min_revision {min_revision} is ahead of the collection's revision {revision}", field="min_revision"
            )

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        """Retrieve (dense, sparse or hybrid), optionally rerank and diversify, and return the top k, each hit
        flagged with the prompt-injection rules its text matches."""
        timer = Timer()
        found = await self.find(request, timer, request_id)
        return SearchResponse(
            collection=request.collection,
            hits=flag_hits(found.hits(request.top_k, request.group_by)),
            timings_ms=timer.report(found.degraded),
            degraded=found.degraded,
        )

    async def find(self, request: SearchRequest, timer: Timer, request_id: str | None = None) -> Candidates:
        """The candidates of a search in their final order: retrieved, then reranked and diversified if asked."""
        collection = await self._registry.get(request.collection)
        depth = max(request.top_k, request.rerank_top_n if request.rerank else 0)
        if request.mmr is not None:
            depth = max(depth, 4 * request.top_k)
        if request.group_by is GroupBy.document:
            depth = max(depth, DOCUMENT_DEPTH * request.top_k)
        found = await self._retrieve(collection, request, depth, timer, request_id)
        if request.rerank and found.order:
            started = time.perf_counter()
            await self._rerank(request.query, found, request.rerank_top_n, request_id)
            timer.stage("rerank", started)
        if request.mmr is not None and found.query_vector is not None and found.order:
            started = time.perf_counter()
            vectors = np.stack([found.chunks[c].vector for c in found.order])
            found.order = self._stages.diversification.run(
                found.query_vector, vectors, found.order, request.mmr.lambda_, request.top_k
            )
            timer.stage("mmr", started)
        return found

    async def _retrieve(
        self, collection: Collection, request: SearchRequest, depth: int, timer: Timer, request_id: str | None
    ) -> Candidates:
        """`_rank` with the version the collection is pinned to, again when a re-index switched it meanwhile (a
        switch to vectors of another width fails the dense search of the former version's query vector)."""
        while True:
            embedder = collection.embedder
            try:
                found = await self._rank(collection, embedder, request, depth, timer, request_id)
            except InvalidArgumentError:
                if collection.embedder == embedder:
                    raise
                continue
            if found.query_vector is None or collection.embedder == embedder:
                return found

    async def _rank(
        self,
        collection: Collection,
        embedder: ModelVersion | None,
        request: SearchRequest,
        depth: int,
        timer: Timer,
        request_id: str | None,
    ) -> Candidates:
        """The top ``depth`` of the rankings the mode and fusion weights ask for (dense, the query embedded by
        ``embedder``, the collection's; BM25 of chunks; BM25 of whole documents, given to the chunks the others
        found), fused when there are several; the lexical ones alone when the embedder is down. A query found
        word for word in the collection takes the fusion's ``verbatim`` weights."""
        stages, found, mode, fusion = self._stages, Candidates(), request.mode, request.fusion
        if mode != SearchMode.sparse:
            started = time.perf_counter()
            version = None if embedder is None else embedder.version  # unpinned (no vectors yet): the default route
            try:
                found.query_vector = (await stages.embedding.run([request.query], request_id, version=version))[0]
            except _DOWN:
                found.degraded.append("embed")
                mode = SearchMode.sparse
            timer.stage("embed", started)
        started = time.perf_counter()
        lexical = mode != SearchMode.dense
        weights = fusion.weights(verbatim=False)
        if lexical and fusion.verbatim is not None:
            part = time.perf_counter()
            weights = fusion.weights(await stages.verbatim.run(collection, request.query, request.filters))
            timer.stage("verbatim", part)
        rankings: dict[str, list[ScoredChunk]] = {}
        if found.query_vector is not None and (mode == SearchMode.dense or weights.dense > 0):
            part = time.perf_counter()
            rankings["dense"] = await stages.dense.run(collection, found.query_vector, depth, request.filters)
            timer.stage("dense", part)
        if lexical and (weights.sparse > 0 or not rankings):
            part = time.perf_counter()
            rankings["sparse"] = await stages.sparse.run(collection, request.query, depth, request.filters)
            timer.stage("sparse", part)
        if lexical and weights.document > 0:
            part = time.perf_counter()
            candidates = list(dict.fromkeys(hit.chunk_id for ranking in rankings.values() for hit in ranking))
            rankings["document"] = await stages.documents.run(
                collection, request.query, candidates, depth, request.filters
            )
            timer.stage("document", part)
        for stage, ranking in rankings.items():
            found.record(stage, ranking)
        part = time.perf_counter()
        fused = stages.fusion.run(rankings, fusion.method, weights, depth)
        timer.stage("fuse", part)
        if len(rankings) > 1:
            found.record("fused", fused)
        order = [hit.chunk_id for hit in fused]
        found.chunks = {c.chunk_id: c for c in await asyncio.to_thread(collection.chunks, order)}
        found.order = [chunk_id for chunk_id in order if chunk_id in found.chunks]
        timer.stage("search", started)  # the whole retrieval: every ranking, the fusion and reading the chunks
        return found

    async def _rerank(self, query: str, found: Candidates, top_n: int, request_id: str | None) -> None:
        """Score the first ``top_n`` candidates by the reranker and reorder them by reciprocal rank fusion of its
        order with the retrieval order (a reranker alone can be worse than its input); the later candidates
        follow as they were. Each reranked chunk gets the fused score (``rerank``, the hit's score) and the
        reranker's own (``reranker``). A reranker that is down leaves the order as is."""
        candidates = found.order[:top_n]
        try:
            scores = await self._stages.reranking.run(query, [found.chunks[c].text for c in candidates], request_id)
        except _DOWN:
            found.degraded.append("rerank")
            return
        fused = fuse_reranked(candidates, [float(score) for score in scores], RERANK_FUSION_K)
        for chunk_id, score in zip(candidates, scores, strict=True):
            found.scores[chunk_id]["reranker"] = float(score)
        for chunk_id, fused_score in fused:
            found.scores[chunk_id]["rerank"] = fused_score
        found.order = [chunk_id for chunk_id, _ in fused] + found.order[top_n:]

"""Reranking fused with the retrieval order: the fusion's arithmetic and ``SearchService._rerank``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.server.errors import UnavailableError
from tritonrag.server.retrieval.fusion import fuse_reranked
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.retrieval.stages import Candidates, SearchStages
from tritonrag.server.services.search import RERANK_FUSION_K, SearchService
from tritonrag.server.store.documents import StoredChunk


def test_fusion_sums_reciprocal_ranks_of_both_orders() -> None:
    fused = fuse_reranked([10, 20, 30], [0.1, 0.5, 0.9], k=60)
    # Retrieval ranks 1, 2, 3; reranker ranks 3, 2, 1: 1/61 + 1/63 (10 and 30, tied: retrieval order) > 2/62.
    assert [item for item, _ in fused] == [10, 30, 20]
    assert dict(fused) == pytest.approx({10: 1 / 61 + 1 / 63, 20: 2 / 62, 30: 1 / 63 + 1 / 61})


def test_fusion_ties_keep_the_retrieval_order_and_agreement_keeps_it() -> None:
    assert [item for item, _ in fuse_reranked([7, 5], [0.0, 1.0])] == [7, 5]  # 1/61 + 1/62 each
    assert [item for item, _ in fuse_reranked([3, 1, 2], [3.0, 2.0, 1.0])] == [3, 1, 2]
    assert fuse_reranked([], []) == []
    with pytest.raises(ValueError, match="2 scores for 1 ids"):
        fuse_reranked([1], [0.5, 0.5])


def test_a_strong_reranker_moves_a_candidate_up_but_not_past_a_consensus() -> None:
    # The reranker puts the retrieval's last of five first: it rises to the middle, not to the top.
    order = [item for item, _ in fuse_reranked([1, 2, 3, 4, 5], [0.5, 0.4, 0.3, 0.2, 0.9], k=1)]
    assert order[0] == 1 and order.index(5) < 4


class _Reranking:
    """Scores passages by a fixed table, or is down; records the passages it was asked about."""

    def __init__(self, scores: dict[str, float], up: bool = True) -> None:
        self.scores, self.up, self.asked = scores, up, list[list[str]]()

    async def run(self, query: str, passages: Sequence[str], request_id: str | None = None) -> npt.NDArray[np.float32]:
        if not self.up:
            raise UnavailableError("reranker is down")
        self.asked.append(list(passages))
        return np.array([self.scores[p] for p in passages], np.float32)


def _found(texts: Sequence[str]) -> Candidates:
    found = Candidates(order=list(range(len(texts))))
    for chunk_id, text in enumerate(texts):
        vector = np.zeros(2, np.float32)
        found.chunks[chunk_id] = StoredChunk(chunk_id, f"doc-{text}", text, 0, len(text), {}, vector)
        found.scores[chunk_id] = {"fused": 1.0 / (60 + chunk_id + 1)}
    return found


def _rerank(reranking: _Reranking, found: Candidates, top_n: int) -> None:
    stages = cast(SearchStages, type("Stages", (), {"reranking": reranking})())
    service = SearchService(cast(CollectionRegistry, None), stages)
    asyncio.run(service._rerank("query", found, top_n, None))


def test_rerank_fuses_the_first_top_n_and_keeps_the_rest_in_place() -> None:
    texts = ["a", "b", "c", "d", "e"]
    reranking = _Reranking({"a": -3.0, "b": -2.0, "c": -1.0})
    found = _found(texts)
    _rerank(reranking, found, top_n=3)
    assert reranking.asked == [["a", "b", "c"]]  # only the first top_n are scored
    expected = fuse_reranked([0, 1, 2], [-3.0, -2.0, -1.0], RERANK_FUSION_K)
    assert found.order == [chunk_id for chunk_id, _ in expected] + [3, 4]
    assert [found.scores[c]["reranker"] for c in range(3)] == [-3.0, -2.0, -1.0]
    assert [found.scores[c]["rerank"] for c, _ in expected] == [score for _, score in expected]
    assert "rerank" not in found.scores[3] and "reranker" not in found.scores[3] and not found.degraded


def test_a_down_reranker_leaves_the_order_and_is_reported() -> None:
    found = _found(["a", "b"])
    _rerank(_Reranking({}, up=False), found, top_n=2)
    assert found.order == [0, 1] and found.degraded == ["rerank"]
    assert all("rerank" not in scores for scores in found.scores.values())

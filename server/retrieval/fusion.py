"""Combining and diversifying ranked lists: reciprocal rank fusion and maximal marginal relevance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> list[tuple[int, float]]:
    """Fuse ranked id lists (best first) by ``score(id) = sum(1 / (k + rank))``, rank counted from 1.

    Returns ``(id, score)`` pairs, best first; ties go to the smaller id.
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


def fuse_reranked(retrieved: Sequence[int], scores: Sequence[float], k: int = 60) -> list[tuple[int, float]]:
    """Reorder ``retrieved`` (best first) by reciprocal rank fusion of that order with the reranker's
    (``scores[i]`` belongs to ``retrieved[i]``, higher is better).

    Returns ``(id, fused score)`` pairs, best first; ties keep the retrieval order.
    """
    if len(scores) != len(retrieved):
        raise ValueError(f"{len(scores)} scores for {len(retrieved)} ids")
    by_score = sorted(range(len(retrieved)), key=lambda i: (-scores[i], i))
    fused = [1.0 / (k + rank) for rank in range(1, len(retrieved) + 1)]
    for rank, index in enumerate(by_score, start=1):
        fused[index] += 1.0 / (k + rank)
    order = sorted(range(len(retrieved)), key=lambda i: (-fused[i], i))
    return [(retrieved[i], fused[i]) for i in order]


def mmr(
    query_vec: npt.NDArray[np.float32],
    candidate_vecs: npt.NDArray[np.float32],
    candidate_ids: Sequence[int],
    lambda_: float,
    top_k: int,
) -> list[int]:
    """Maximal marginal relevance over unit vectors: pick ``top_k`` ids, each maximising
    ``lambda_ * cos(query, c) - (1 - lambda_) * max(cos(c, s) for s already picked)``.

    ``lambda_ = 1`` is ranking by relevance alone; ``0`` is diversity alone.
    """
    count = min(top_k, len(candidate_ids))
    if count <= 0:
        return []
    vectors = np.asarray(candidate_vecs, np.float32)
    relevance = vectors @ np.asarray(query_vec, np.float32).reshape(-1)
    redundancy = np.full(len(vectors), -np.inf, np.float32)
    available = np.ones(len(vectors), bool)
    picked: list[int] = []
    for _ in range(count):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = np.where(available, lambda_ * relevance - (1.0 - lambda_) * penalty, -np.inf)
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, vectors @ vectors[best])
    return [candidate_ids[i] for i in picked]

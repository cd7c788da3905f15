"""Combining and diversifying ranked lists: rank fusion, normalised score fusion, maximal marginal relevance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

Ranking = Sequence[tuple[int, float]]  # (id, score), best first
Normalisation = Literal["minmax", "zscore"]


def _ranks(ranking: Ranking) -> list[int]:
    """Each item's rank from 1; tied scores share the better rank (a document's chunks under its one score)."""
    ranks, previous = [], None
    for position, (_, score) in enumerate(ranking, start=1):
        if previous is None or score != previous[1]:
            previous = (position, score)
        ranks.append(previous[0])
    return ranks


def _checked(rankings: Sequence[Ranking], weights: Sequence[float] | None) -> Sequence[float]:
    if weights is None:
        return [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    return weights


def _best_first(scores: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


def _normalise(raw: npt.NDArray[np.float64], normalisation: Normalisation) -> npt.NDArray[np.float64]:
    """Min-max to [0, 1] (all equal: 1), or z-scores (all equal: 0)."""
    if not len(raw):
        return raw
    if normalisation == "minmax":
        spread = raw.max() - raw.min()
        return (raw - raw.min()) / spread if spread > 0 else np.ones_like(raw)
    deviation = raw.std()
    return (raw - raw.mean()) / deviation if deviation > 0 else np.zeros_like(raw)


def reciprocal_rank_fusion(
    rankings: Sequence[Ranking], weights: Sequence[float] | None = None, k: int = 60
) -> list[tuple[int, float]]:
    """Fuse rankings by ``score(id) = sum(weight / (k + rank))``, rank counted from 1 (tied scores share one).

    Returns ``(id, score)`` pairs, best first; ties go to the smaller id.
    """
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, _checked(rankings, weights), strict=True):
        for (item, _), rank in zip(ranking, _ranks(ranking), strict=True):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return _best_first(scores)


def normalised_fusion(
    rankings: Sequence[Ranking], weights: Sequence[float] | None, normalisation: Normalisation
) -> list[tuple[int, float]]:
    """Fuse rankings by a weighted sum of their scores, each list's scores normalised first: ``minmax`` to
    [0, 1], ``zscore`` to mean 0 and unit deviation. An id a list lacks gets the floor of that list: 0 for
    ``minmax``, the list's lowest z-score for ``zscore``. Returns ``(id, score)`` pairs, best first; ties go to
    the smaller id.
    """
    weights = _checked(rankings, weights)
    normalised = []
    for ranking in rankings:
        raw = np.asarray([score for _, score in ranking], np.float64)
        values = _normalise(raw, normalisation)
        floor = 0.0 if normalisation == "minmax" or not len(values) else float(values.min())
        normalised.append(({item: float(v) for (item, _), v in zip(ranking, values, strict=True)}, floor))
    items = {item for ranking in rankings for item, _ in ranking}
    scores = {
        item: sum(w * known.get(item, floor) for (known, floor), w in zip(normalised, weights, strict=True))
        for item in items
    }
    return _best_first(scores)


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

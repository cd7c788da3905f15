"""Reciprocal rank fusion and maximal marginal relevance."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.server.retrieval.fusion import mmr, reciprocal_rank_fusion


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)
    assert [item for item, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)


def test_rrf_ties_go_to_the_smaller_id_and_empty_input_is_empty() -> None:
    assert [item for item, _ in reciprocal_rank_fusion([[7, 5], [5, 7]])] == [5, 7]
    assert reciprocal_rank_fusion([]) == [] and reciprocal_rank_fusion([[], []]) == []


def unit(*rows: list[float]) -> npt.NDArray[np.float32]:
    matrix = np.array(rows, np.float32)
    unit_rows: npt.NDArray[np.float32] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit_rows


QUERY = unit([1.0, 0.0, 0.0])[0]
# 10 and 11 are near-duplicates close to the query; 12 is less relevant but different.
CANDIDATES = unit([1.0, 0.1, 0.0], [1.0, 0.11, 0.0], [0.7, 0.0, 0.7])
IDS = [10, 11, 12]


def test_mmr_with_lambda_one_is_relevance_order() -> None:
    assert mmr(QUERY, CANDIDATES, IDS, lambda_=1.0, top_k=3) == [10, 11, 12]


def test_mmr_prefers_diversity_over_a_near_duplicate() -> None:
    assert mmr(QUERY, CANDIDATES, IDS, lambda_=0.5, top_k=2) == [10, 12]


def test_mmr_bounds() -> None:
    assert mmr(QUERY, CANDIDATES, IDS, lambda_=0.5, top_k=10) == [10, 12, 11]
    assert mmr(QUERY, CANDIDATES[:0], [], lambda_=0.5, top_k=3) == []

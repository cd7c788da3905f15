"""Rank fusion, normalised score fusion and maximal marginal relevance."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.server.retrieval.fusion import mmr, normalised_fusion, reciprocal_rank_fusion


def ranked(*ids: int) -> list[tuple[int, float]]:
    """``ids`` best first, with distinct descending scores."""
    return [(item, float(len(ids) - position)) for position, item in enumerate(ids)]


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = reciprocal_rank_fusion([ranked(1, 2, 3), ranked(3, 1)], k=60)
    assert [item for item, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)


def test_rrf_weights_scale_each_ranking_and_tied_scores_share_a_rank() -> None:
    fused = dict(reciprocal_rank_fusion([ranked(1, 2), [(3, 5.0), (2, 5.0), (1, 1.0)]], weights=[0.5, 2.0], k=10))
    assert fused[1] == pytest.approx(0.5 / 11 + 2.0 / 13)
    assert fused[2] == pytest.approx(0.5 / 12 + 2.0 / 11)  # tied with 3 for first place in the second ranking
    assert fused[3] == pytest.approx(2.0 / 11)


def test_rrf_ties_go_to_the_smaller_id_and_empty_input_is_empty() -> None:
    assert [item for item, _ in reciprocal_rank_fusion([ranked(7, 5), ranked(5, 7)])] == [5, 7]
    assert reciprocal_rank_fusion([]) == [] and reciprocal_rank_fusion([[], []]) == []


def test_minmax_fusion_is_a_weighted_sum_of_scores_scaled_to_unit_range() -> None:
    dense = [(1, 0.9), (2, 0.7), (3, 0.5)]  # scaled: 1.0, 0.5, 0.0
    sparse = [(3, 12.0), (4, 4.0)]  # scaled: 1.0, 0.0; 1 and 2 are missing: 0
    fused = normalised_fusion([dense, sparse], [0.75, 0.25], "minmax")
    assert fused == [(1, pytest.approx(0.75)), (2, pytest.approx(0.375)), (3, pytest.approx(0.25)), (4, 0.0)]


def test_zscore_fusion_gives_a_missing_id_the_lowest_z_of_that_ranking() -> None:
    dense = [(1, 3.0), (2, 1.0)]  # z: 1, -1
    sparse = [(2, 10.0), (3, 6.0), (4, 2.0)]  # z: 1.2247, 0, -1.2247; 1 is missing: -1.2247
    fused = dict(normalised_fusion([dense, sparse], [1.0, 1.0], "zscore"))
    assert fused[1] == pytest.approx(1 - 1.224745)
    assert fused[2] == pytest.approx(-1 + 1.224745)
    assert fused[3] == pytest.approx(-1 + 0.0)  # missing from dense: its lowest z, -1
    assert max(fused, key=fused.__getitem__) == 2


def test_normalised_fusion_of_one_item_or_equal_scores_does_not_divide_by_zero() -> None:
    assert normalised_fusion([[(5, 2.0)]], None, "minmax") == [(5, 1.0)]
    assert normalised_fusion([[(5, 2.0), (6, 2.0)]], None, "zscore") == [(5, 0.0), (6, 0.0)]
    assert normalised_fusion([], None, "minmax") == []


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

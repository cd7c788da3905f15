"""SparseIndex: BM25 ranking on real sentences, filters, removal and compaction, snapshots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tritonrag.server.retrieval.snapshot import SnapshotError
from tritonrag.server.retrieval.sparse import SparseIndex, tokenize

SENTENCES = [
    "The cat sat on the mat and purred while the rain fell outside.",
    "Dogs are loyal companions and love long walks in the park.",
    "A healthy cat food contains protein, taurine and very little grain.",
    "The central bank raised interest rates to slow down inflation.",
    "Inflation erodes the purchasing power of savings over time.",
    "Python's garbage collector frees objects that are no longer referenced.",
    "The cat chased the dog around the garden until both were tired.",
]
IDS = np.arange(10, 10 + len(SENTENCES), dtype=np.int64)


def index_of(sentences: list[str] = SENTENCES) -> SparseIndex:
    index = SparseIndex()
    index.add(IDS[: len(sentences)], sentences)
    return index


def ranked(index: SparseIndex, query: str, k: int = 3) -> list[int]:
    return [int(i) - 10 for i in index.search(query, k)[1]]


def test_tokenize_folds_case_and_keeps_unicode_words() -> None:
    assert tokenize("Straße, CAFÉ au-lait: x2!") == ["strasse", "café", "au", "lait", "x2"]


def test_ranking_of_real_sentences() -> None:
    index = index_of()
    assert ranked(index, "cat food")[0] == 2  # both terms
    assert ranked(index, "interest rates inflation")[:2] == [3, 4]
    assert ranked(index, "garbage collector")[:1] == [5]
    assert set(ranked(index, "cat", k=10)) == {0, 2, 6}
    assert ranked(index, "the") != [] and ranked(index, "unknown words") == []


def test_bm25_scores_match_the_formula() -> None:
    index = index_of(["a b", "a c c c"])
    scores, ids = index.search("c", 2)
    n, df, k1, b, avg = 2, 1, 1.2, 0.75, 3.0
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * 3 * (k1 + 1) / (3 + k1 * (1 - b + b * 4 / avg))
    assert ids.tolist() == [11] and scores[0] == pytest.approx(expected, rel=1e-5)


def test_rare_terms_outweigh_common_ones_and_shorter_wins_ties() -> None:
    index = index_of(["apple banana", "apple cherry", "apple banana banana filler words here"])
    assert ranked(index, "apple cherry", k=1) == [1]
    assert ranked(index, "banana", k=2) == [0, 2]


def test_filter_masks_candidates_before_the_cut() -> None:
    index = index_of()
    assert index.search("cat", 1, allowed=IDS[[6, 3]])[1].tolist() == [16]
    assert index.search("cat", 5, allowed=IDS[[3]])[1].tolist() == []


def test_remove_and_compact() -> None:
    sentences = [f"common word{i}" for i in range(3000)]
    index = SparseIndex()
    ids = np.arange(3000, dtype=np.int64)
    index.add(ids, sentences)
    index.remove(ids[:2000])  # more dead than live: compacts
    assert len(index) == 1000 and index.ids().tolist() == list(range(2000, 3000))
    assert index.search("word5", 5)[1].tolist() == []
    assert index.search("word2500", 5)[1].tolist() == [2500]
    assert len(index.search("common", 2000)[1]) == 1000
    index.add(np.array([5000], np.int64), ["word5 again"])
    assert index.search("word5", 5)[1].tolist() == [5000]


def test_snapshot_round_trip(tmp_path: Path) -> None:
    index = index_of()
    index.remove(IDS[[1]])
    index.save(tmp_path / "sparse", revision=3)
    loaded, generation = SparseIndex.load(tmp_path / "sparse")
    assert generation == 3 and loaded.ids().tolist() == index.ids().tolist()
    for query in ("cat", "inflation savings", "dogs"):
        np.testing.assert_array_equal(loaded.search(query, 5)[0], index.search(query, 5)[0])
        np.testing.assert_array_equal(loaded.search(query, 5)[1], index.search(query, 5)[1])
    empty = tmp_path / "empty"
    SparseIndex().save(empty, revision=0)
    assert len(SparseIndex.load(empty)[0]) == 0


def test_corrupt_snapshot_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    index_of().save(path, revision=1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        SparseIndex.load(path)

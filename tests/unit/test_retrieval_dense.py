"""DenseIndex: exactness of Flat, recall of IVF and HNSW, filters before the top-k cut, removal, snapshots."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.clients.wire.schema import IndexType
from tritonrag.server.config import DenseParams
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.retrieval.dense import DenseIndex

DIM = 32
N = 4000
K = 10
# Small-data parameters: IVF trains once there are 39 * 32 = 1248 vectors.
PARAMS = DenseParams(nlist=32, nprobe=20, hnsw_m=16, ef_construction=64, ef_search=64)
KINDS = [IndexType.flat, IndexType.ivf, IndexType.hnsw]


def unit(n: int, seed: int) -> npt.NDArray[np.float32]:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    unit_rows: npt.NDArray[np.float32] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit_rows


class Source:
    """A VectorSource over arrays."""

    def __init__(self, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        self.ids, self.vectors = ids, vectors

    def chunk_count(self) -> int:
        return len(self.ids)

    def sample_vectors(self, n: int, seed: int = 0) -> npt.NDArray[np.float32]:
        return self.vectors[:n]

    def iter_vectors(
        self, ids: npt.NDArray[np.int64] | None = None
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        yield self.ids, self.vectors


IDS = np.arange(1000, 1000 + N, dtype=np.int64)  # ids are not row numbers
BASE = unit(N, 0)
QUERIES = unit(50, 1)


def brute_force(allowed: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.int64]:
    """The exact top-k ids of QUERIES among ``allowed`` (all when None)."""
    rows = np.arange(N) if allowed is None else np.searchsorted(IDS, allowed)
    scores = QUERIES @ BASE[rows].T
    top: npt.NDArray[np.int64] = IDS[rows][np.argsort(-scores, axis=1)[:, :K]]
    return top


def built(kind: IndexType) -> DenseIndex:
    """A fresh index of ``kind`` over BASE."""
    index = DenseIndex(DIM, kind, PARAMS)
    index.rebuild(Source(IDS, BASE))
    assert index.kind is kind and len(index) == N
    return index


@functools.cache
def shared(kind: IndexType) -> DenseIndex:
    """One index of ``kind`` over BASE for the tests that only search."""
    return built(kind)


def recall(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def test_flat_is_exact_against_numpy_brute_force() -> None:
    scores, ids = shared(IndexType.flat).search(QUERIES, K)
    np.testing.assert_array_equal(ids, brute_force())
    np.testing.assert_allclose(scores, np.sort(QUERIES @ BASE.T, axis=1)[:, ::-1][:, :K], atol=1e-5)


@pytest.mark.parametrize("kind", [IndexType.ivf, IndexType.hnsw])
def test_approximate_recall(kind: IndexType) -> None:
    assert recall(shared(kind).search(QUERIES, K)[1], brute_force()) >= 0.9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", [0.03, 0.4])
def test_filter_applies_before_the_top_k_cut(kind: IndexType, share: float) -> None:
    allowed = np.sort(np.random.default_rng(2).choice(IDS, size=int(share * N), replace=False))
    ids = shared(kind).search(QUERIES, K, allowed)[1]
    assert (ids >= 0).all(), "k hits whenever k vectors pass the filter"
    assert np.isin(ids, allowed).all()
    truth = brute_force(allowed)
    if kind is IndexType.flat or share < PARAMS.exact_fraction:  # small sets are searched exactly
        np.testing.assert_array_equal(ids, truth)
    else:
        assert recall(ids, truth) >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_filter_with_fewer_than_k_allowed(kind: IndexType) -> None:
    index = shared(kind)
    ids = index.search(QUERIES[:1], K, IDS[[5, 7]])[1]
    assert sorted(ids[0, :2].tolist()) == IDS[[5, 7]].tolist() and ids[0, 2:].tolist() == [-1] * (K - 2)
    assert index.search(QUERIES[:1], K, IDS[:0])[1].tolist() == [[-1] * K]


@pytest.mark.parametrize("kind", KINDS)
def test_removed_ids_are_never_returned(kind: IndexType) -> None:
    index = built(kind)
    top = brute_force()[:, 0]
    index.remove(np.unique(top))
    assert len(index) == N - len(np.unique(top))
    assert not np.isin(index.search(QUERIES, K)[1], top).any()
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(IDS, top))
    index.add(IDS[:0], BASE[:0])  # empty writes are no-ops
    index.remove(IDS[:0])


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_round_trip(kind: IndexType, tmp_path: Path) -> None:
    index = shared(kind)
    index.save(tmp_path / "dense", revision=7)
    loaded, generation = DenseIndex.load(tmp_path / "dense", DIM, kind, PARAMS)
    assert generation == 7 and loaded.kind is kind
    np.testing.assert_array_equal(loaded.search(QUERIES, K)[1], index.search(QUERIES, K)[1])
    loaded.remove(IDS[:10])  # IVF keeps its hash-table direct map across a snapshot
    assert len(loaded) == N - 10 and not np.isin(loaded.search(QUERIES, K)[1], IDS[:10]).any()


def test_hnsw_tombstones_call_for_a_rebuild() -> None:
    index = built(IndexType.hnsw)
    index.remove(IDS[: N // 10])
    assert not index.needs_rebuild()
    index.remove(IDS[N // 10 : N // 4])
    assert index.needs_rebuild()
    index.rebuild(Source(IDS[N // 4 :], BASE[N // 4 :]))
    assert not index.needs_rebuild() and len(index) == N - N // 4


def test_auto_switches_with_hysteresis() -> None:
    params = DenseParams(nlist=8, auto_threshold=1000, auto_kind=IndexType.ivf)
    index = DenseIndex(DIM, IndexType.auto, params)
    index.add(IDS[:999], BASE[:999])
    steps = [(index.kind, index.needs_rebuild())]
    index.add(IDS[999:1000], BASE[999:1000])
    steps.append((index.kind, index.needs_rebuild()))
    index.rebuild(Source(IDS[:1000], BASE[:1000]))
    steps.append((index.kind, index.needs_rebuild()))
    index.remove(IDS[:400])  # 600 left: above half the threshold, stays IVF
    steps.append((index.kind, index.needs_rebuild()))
    index.remove(IDS[400:600])  # 400 left: below half
    steps.append((index.kind, index.needs_rebuild()))
    index.rebuild(Source(IDS[600:1000], BASE[600:1000]))
    steps.append((index.kind, index.needs_rebuild()))
    flat, ivf = IndexType.flat, IndexType.ivf
    assert steps == [(flat, False), (flat, True), (ivf, False), (ivf, False), (ivf, True), (flat, False)]


def test_ivf_stays_flat_until_it_can_be_trained() -> None:
    index = DenseIndex(DIM, IndexType.ivf, PARAMS)
    index.add(IDS[:100], BASE[:100])
    assert index.kind is IndexType.flat and not index.needs_rebuild()


def test_bad_queries_are_rejected() -> None:
    index = shared(IndexType.flat)
    with pytest.raises(InvalidArgumentError):
        index.search(QUERIES[:, :5], K)
    with pytest.raises(InvalidArgumentError):
        index.search(QUERIES, 0)

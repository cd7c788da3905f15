"""Vector search benchmark of `DenseIndex` (Flat, IVF, HNSW) against NumPy and the machine's memory bandwidth.

For each size and data set (fixed seed): queries/s and p50/p95 latency at batch 1 and batch 64,
recall@10 against exact search (a NumPy matrix product), and resident memory per vector. Two
data sets: ``iid``, unit vectors drawn uniformly on the sphere (the worst case for approximate
search: every point is about as far from a query as every other), and ``clustered``, a Gaussian
mixture of clusters of ~100 points, the kind of neighbourhood structure real text embeddings
have. Memory-copy bandwidth is measured in the same run (``np.copyto`` of a 1 GiB buffer;
STREAM convention: bytes read + bytes written).

``python bench/search.py`` runs the default plan (100k and 1M, ~10 minutes on 2 cores) and
prints a markdown table and the targets' verdicts.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import faiss
import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import IndexType
from tritonrag.server.config import DenseParams
from tritonrag.server.retrieval.dense import DenseIndex

FloatMatrix = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
DIMENSION = 384
K = 10
BATCH = 64
CLUSTER_SIZE = 100  # "clustered": a Gaussian mixture of n / CLUSTER_SIZE clusters
NOISE = 1.0  # within-cluster cosine ≈ 1 / (1 + NOISE²) = 0.5; between clusters ≈ 0
BLOCK = 100_000


def unit_rows(matrix: FloatMatrix) -> FloatMatrix:
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def make_data(kind: str, n: int, queries: int, seed: int) -> tuple[FloatMatrix, FloatMatrix]:
    """``n`` database vectors and ``queries`` query vectors of data set ``kind``, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // CLUSTER_SIZE), DIMENSION), dtype=np.float32)

    def block(rows: int) -> FloatMatrix:
        noise = rng.standard_normal((rows, DIMENSION), dtype=np.float32)
        if kind == "iid":
            return unit_rows(noise)
        return unit_rows(centers[rng.integers(len(centers), size=rows)] + NOISE * noise)

    base = np.empty((n, DIMENSION), np.float32)
    for start in range(0, n, BLOCK):
        base[start : start + BLOCK] = block(min(BLOCK, n - start))
    return base, block(queries)


@dataclass
class ArraySource:
    """The `VectorSource` of vectors held in memory (ids are row numbers)."""

    vectors: FloatMatrix

    def chunk_count(self) -> int:
        return len(self.vectors)

    def sample_vectors(self, n: int, seed: int = 0) -> FloatMatrix:
        rows = np.random.default_rng(seed).choice(len(self.vectors), size=min(n, len(self.vectors)), replace=False)
        return self.vectors[np.sort(rows)]

    def iter_vectors(self, ids: IdArray | None = None) -> Iterator[tuple[IdArray, FloatMatrix]]:
        for start in range(0, len(self.vectors), BLOCK):
            rows = np.arange(start, min(start + BLOCK, len(self.vectors)), dtype=np.int64)
            yield rows, self.vectors[rows]


def rss_bytes() -> int:
    """Resident memory, after handing freed heap back to the OS (so reuse of it is not missed)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def copy_bandwidth(size: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved by ``np.copyto`` (read + write), best of ``repeats``."""
    src = np.ones(size // 4, np.float32)
    dst = np.zeros_like(src)  # touched, so that no page faults are timed

    def copy() -> None:
        np.copyto(dst, src)

    return 2 * size / min(_timed(copy) for _ in range(repeats))


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def numpy_search(base: FloatMatrix, queries: FloatMatrix, k: int) -> IdArray:
    """Exact top-k by a matrix product and a partial sort: the baseline and the ground truth."""
    scores = queries @ base.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


@dataclass
class Timing:
    qps: float
    p50_ms: float
    p95_ms: float


def measure(search: Callable[[FloatMatrix], IdArray], queries: FloatMatrix, batch: int, budget_s: float) -> Timing:
    """Latency of ``search`` on consecutive batches of ``queries`` until they or ``budget_s`` run out."""
    search(queries[:batch])  # warm-up
    latencies = []
    spent = 0.0
    for start in range(0, len(queries) - batch + 1, batch):
        began = time.perf_counter()
        search(queries[start : start + batch])
        latencies.append(time.perf_counter() - began)
        spent += latencies[-1]
        if spent > budget_s and len(latencies) >= 3:
            break
    seconds = np.array(latencies)
    return Timing(batch / seconds.mean(), 1e3 * np.percentile(seconds, 50), 1e3 * np.percentile(seconds, 95))


def top_ids(index: DenseIndex, queries: FloatMatrix) -> IdArray:
    return index.search(queries, K)[1]


def recall(found: IdArray, truth: IdArray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@dataclass
class Row:
    size: int
    data: str
    method: str
    build_s: float
    bytes_per_vector: float
    recall: float
    batch1: Timing
    batch64: Timing


def build(kind: IndexType, base: FloatMatrix, params: DenseParams) -> tuple[DenseIndex, float, float]:
    """The index, its build time and its resident bytes per vector."""
    before = rss_bytes()
    start = time.perf_counter()
    index = DenseIndex(DIMENSION, kind, params)
    if kind is IndexType.ivf:
        index.rebuild(ArraySource(base))
    else:
        index.add(np.arange(len(base), dtype=np.int64), base)
    return index, time.perf_counter() - start, (rss_bytes() - before) / len(base)


def run(
    sizes: list[int],
    datasets: list[str],
    hnsw_max: int,
    iid_approx_max: int,
    queries: int,
    seed: int,
    params: DenseParams,
) -> None:
    bandwidth = copy_bandwidth()
    print(f"memory-copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write, np.copyto, 1 GiB)", flush=True)
    rows: list[Row] = []
    for size in sizes:
        for data in datasets:
            approximate = [IndexType.ivf] + ([IndexType.hnsw] if size <= hnsw_max else [])
            kinds = [IndexType.flat] + (approximate if data == "clustered" or size <= iid_approx_max else [])
            rows += bench_data_set(size, data, kinds, queries, seed, params)
    report(rows, bandwidth, params)


def bench_data_set(
    size: int, data: str, kinds: list[IndexType], queries: int, seed: int, params: DenseParams
) -> list[Row]:
    """The NumPy baseline and each index kind on one data set."""
    base, query_vectors = make_data(data, size, queries, seed)
    budget = 10.0 if size >= 1_000_000 else 4.0
    truth = numpy_search(base, query_vectors, K)

    def evaluate(method: str, search: Callable[[FloatMatrix], IdArray], build_s: float, per_vector: float) -> Row:
        batch1 = measure(search, query_vectors, 1, budget)
        batch64 = measure(search, query_vectors, BATCH, budget)
        row = Row(size, data, method, build_s, per_vector, recall(search(query_vectors), truth), batch1, batch64)
        print(_row(row), flush=True)
        return row

    rows = [evaluate("numpy", lambda q: numpy_search(base, q, K), 0.0, 4.0 * DIMENSION)]
    for kind in kinds:
        index, build_s, per_vector = build(kind, base, params)
        rows.append(evaluate(kind.value, partial(top_ids, index), build_s, per_vector))
        del index
    return rows


def _row(row: Row) -> str:
    return (
        f"| {row.size:,} | {row.data} | {row.method} | {row.build_s:.1f} | {row.bytes_per_vector:,.0f} "
        f"| {row.recall:.3f} | {row.batch1.qps:,.1f} | {row.batch1.p50_ms:.2f} | {row.batch1.p95_ms:.2f} "
        f"| {row.batch64.qps:,.1f} | {row.batch64.p50_ms:.1f} | {row.batch64.p95_ms:.1f} |"
    )


def report(rows: list[Row], bandwidth: float, params: DenseParams) -> None:
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}")
    print(
        f"Parameters: IVF nlist={params.nlist} nprobe={params.nprobe} (spherical k-means); "
        f"HNSW M={params.hnsw_m} efConstruction={params.ef_construction} efSearch={params.ef_search}"
    )
    print()
    print(
        "| vectors | data | method | build s | bytes/vector | recall@10 | b1 q/s | b1 p50 ms | b1 p95 ms "
        "| b64 q/s | b64 p50 ms | b64 p95 ms |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_row(row))
    print()
    by_key = {(row.size, row.data, row.method): row for row in rows}
    for size, data in sorted({(row.size, row.data) for row in rows}):
        flat, numpy_row = by_key[(size, data, "flat")], by_key[(size, data, "numpy")]
        read_ms = 1e3 * size * DIMENSION * 4 / bandwidth
        print(
            f"- {size:,} {data}: Flat b64 {flat.batch64.qps:,.1f} q/s vs NumPy {numpy_row.batch64.qps:,.1f} q/s "
            f"({flat.batch64.qps / numpy_row.batch64.qps:.2f}x, target >= 1); Flat b1 p50 {flat.batch1.p50_ms:.1f} ms "
            f"vs reading the vectors once {read_ms:.1f} ms ({flat.batch1.p50_ms / read_ms:.2f}x, target <= 1.5)"
        )
        for method in ("ivf", "hnsw"):
            approx = by_key.get((size, data, method))
            if approx is not None:
                print(
                    f"  - {method}: recall@10 {approx.recall:.3f} (target >= 0.95) at "
                    f"{approx.batch1.qps / flat.batch1.qps:.1f}x Flat's b1 q/s and "
                    f"{approx.batch64.qps / flat.batch64.qps:.1f}x its b64 q/s (target >= 10x at 1M)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data", nargs="+", choices=["iid", "clustered"], default=["iid", "clustered"])
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW at")
    parser.add_argument(
        "--iid-approx-max", type=int, default=100_000, help="largest iid size to build IVF/HNSW at (hopeless there)"
    )
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobe", type=int, default=DenseParams().nprobe)
    parser.add_argument("--ef-search", type=int, default=DenseParams().ef_search)
    args = parser.parse_args()
    params = DenseParams(nprobe=args.nprobe, ef_search=args.ef_search)
    run(args.sizes, args.data, args.hnsw_max, args.iid_approx_max, args.queries, args.seed, params)


if __name__ == "__main__":
    main()

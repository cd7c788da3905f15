"""`DenseIndex`: the FAISS index of one collection's chunk vectors (inner product on unit vectors = cosine).

Kinds: ``flat`` (exact) and ``hnsw`` are an ``IndexIDMap2`` over ``IndexFlatIP`` / ``IndexHNSWFlat``;
``ivf`` is an ``IndexIVFFlat`` that stores the chunk ids itself, with a hash-table direct map
(an ``IndexIDMap`` over IVF cannot remove ids: it assumes the inner index renumbers, as only
Flat does). HNSW cannot remove vectors: removed ids become tombstones that searches exclude,
and the index is rebuilt once they pass a share of it. ``auto`` is Flat below
`DenseParams.auto_threshold` vectors and `DenseParams.auto_kind` above; a change of kind is a
rebuild from the store (`rebuild`).

Filters arrive as the set of allowed ids and apply before the top-k cut: a small set is searched
exactly over its own vectors, a large one through an ``IDSelectorBatch``; an approximate search
that finds fewer than k allowed vectors is redone exactly, so a filtered search returns k hits
whenever k vectors pass the filter.

With a GPU (``faiss.get_num_gpus() > 0``), unfiltered Flat and IVF searches run on a GPU copy
that is refreshed lazily after writes; writes, filtered searches and snapshots use the CPU index.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from tritonrag.clients.wire.schema import IndexType
from tritonrag.server.config import DenseParams
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.retrieval.snapshot import (
    PayloadReader,
    PayloadWriter,
    SnapshotError,
    read_snapshot,
    snapshot_revision,
    write_snapshot,
)
from tritonrag.server.store.documents import FloatMatrix, IdArray, unit_vectors

# k-means trains on at most this many sampled vectors per IVF list.
TRAIN_PER_LIST = 64
# Smaller batches search on the calling thread alone: concurrent requests are the parallelism, and
# an OpenMP team costs more than it saves on them (up to 5x more on a busy machine, where the
# team's waiting threads spin against the working one). The thread count is per calling thread.
PARALLEL_MIN_QUERIES = 8
# Batches of at least this many queries search Flat with NumPy's BLAS over FAISS's own storage:
# the BLAS bundled with faiss-cpu wheels multiplies ~3x slower here (docs/BENCHMARKS.md).
BLAS_MIN_QUERIES = 16
BLAS_BLOCK = 1 << 15
_MAX_THREADS = faiss.omp_get_max_threads()


class VectorSource(Protocol):
    """Where a rebuild reads the vectors from (the `DocumentStore`)."""

    def chunk_count(self) -> int:
        """The number of vectors."""
        ...

    def sample_vectors(self, n: int, seed: int = 0) -> FloatMatrix:
        """Up to ``n`` vectors chosen at random."""
        ...

    def iter_vectors(self, ids: IdArray | None = None) -> Iterator[tuple[IdArray, FloatMatrix]]:
        """All ``(ids, vectors)`` in batches."""
        ...


SearchResult = tuple[FloatMatrix, IdArray]


class DenseIndex:
    """Vectors by chunk id; `search` returns ``(scores, ids)`` of shape ``(queries, k)``, padded with id -1.

    Not thread-safe for writes: callers serialise writes against everything else (`Collection`'s
    lock); concurrent searches are safe.
    """

    def __init__(
        self, dimension: int, index_type: IndexType = IndexType.auto, params: DenseParams | None = None
    ) -> None:
        """An empty index for ``dimension``-wide vectors; ``index_type`` is the collection's request."""
        self.dimension = dimension
        self.index_type = index_type
        self.params = params or DenseParams()
        self._kind = self._planned_kind(0, IndexType.flat)
        self._index = self._new_index(self._kind)
        self._deleted = np.empty(0, np.int64)
        self._gpu_lock = threading.Lock()
        self._gpu_resources: Any = faiss.StandardGpuResources() if faiss.get_num_gpus() > 0 else None
        self._gpu_index: Any = None

    @property
    def kind(self) -> IndexType:
        """The active kind: ``flat``, ``ivf`` or ``hnsw``."""
        return self._kind

    def __len__(self) -> int:
        return int(self._index.ntotal) - len(self._deleted)

    # --- writes -------------------------------------------------------------------------------

    def add(self, ids: IdArray, vectors: FloatMatrix) -> None:
        """Add unit ``vectors`` under new ``ids``."""
        if len(ids):
            faiss.omp_set_num_threads(_MAX_THREADS)
            self._index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
            self._gpu_index = None

    def remove(self, ids: IdArray) -> None:
        """Remove ``ids``, which must be in the index."""
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, np.int64)
        if self._kind is IndexType.hnsw:
            self._deleted = np.union1d(self._deleted, ids)
        elif self._kind is IndexType.ivf:  # its hash-table direct map takes an array selector only
            self._index.remove_ids(faiss.IDSelectorArray(ids))
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
        self._gpu_index = None

    def needs_rebuild(self) -> bool:
        """Whether the size calls for another kind, or HNSW tombstones pass their share."""
        too_many_deleted = len(self._deleted) > self.params.max_deleted_fraction * max(1, self._index.ntotal)
        return too_many_deleted or self._planned_kind(len(self), self._kind) is not self._kind

    def rebuild(self, source: VectorSource) -> None:
        """Build the planned kind afresh from every vector of ``source``."""
        kind = self._planned_kind(source.chunk_count(), self._kind)
        index = self._new_index(kind)
        faiss.omp_set_num_threads(_MAX_THREADS)
        if kind is IndexType.ivf:
            index.train(source.sample_vectors(self.params.nlist * TRAIN_PER_LIST))
        for ids, vectors in source.iter_vectors():
            index.add_with_ids(vectors, ids)
        self._index, self._kind, self._deleted, self._gpu_index = index, kind, np.empty(0, np.int64), None

    def _planned_kind(self, count: int, current: IndexType) -> IndexType:
        if self.index_type in (IndexType.flat, IndexType.hnsw):
            return self.index_type
        target = self.params.auto_kind if self.index_type is IndexType.auto else IndexType.ivf
        threshold = self.params.auto_threshold if self.index_type is IndexType.auto else 0
        if target is IndexType.ivf:
            threshold = max(threshold, self.params.ivf_min_vectors)
        # Hysteresis: once switched, go back to Flat only below half the threshold.
        return target if count >= (threshold // 2 if current is target else threshold) else IndexType.flat

    def _new_index(self, kind: IndexType) -> Any:
        metric = faiss.METRIC_INNER_PRODUCT
        if kind is IndexType.flat:
            return faiss.index_factory(self.dimension, "IDMap2,Flat", metric)
        if kind is IndexType.hnsw:
            index: Any = faiss.index_factory(self.dimension, f"IDMap2,HNSW{self.params.hnsw_m}", metric)
            graph: Any = faiss.downcast_index(index.index)
            graph.hnsw.efConstruction = self.params.ef_construction
            return index
        index = faiss.index_factory(self.dimension, f"IVF{self.params.nlist},Flat", metric)
        index.cp.spherical = True
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        self._configure(index, kind)
        return index

    def _configure(self, index: Any, kind: IndexType) -> None:
        """Set the search defaults that a GPU copy inherits."""
        if kind is IndexType.ivf:
            index.nprobe = self.params.nprobe

    # --- reads --------------------------------------------------------------------------------

    def ids(self) -> IdArray:
        """The ids in the index, ascending."""
        if self._kind is IndexType.ivf:
            invlists = self._index.invlists
            parts = [
                faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy() for i in range(invlists.nlist)
            ]
            return np.sort(np.concatenate([np.empty(0, np.int64), *parts]))
        ids = np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))
        return np.setdiff1d(ids, self._deleted, assume_unique=True) if len(self._deleted) else ids

    def search(self, queries: FloatMatrix, k: int, allowed: IdArray | None = None) -> SearchResult:
        """The ``k`` best ids by cosine for each query, among ``allowed`` ids when given."""
        if k < 1:
            raise InvalidArgumentError("k must be at least 1", field="top_k")
        queries = unit_vectors(queries, self.dimension, "vector")
        faiss.omp_set_num_threads(_MAX_THREADS if len(queries) >= PARALLEL_MIN_QUERIES else 1)
        if allowed is None:
            return self._search_all(queries, k)
        allowed = np.ascontiguousarray(allowed, np.int64)
        if len(allowed) <= self.params.exact_fraction * len(self):
            return self._exact(queries, k, allowed)
        selector = faiss.IDSelectorBatch(allowed)
        scores, ids = self._index.search(queries, k, params=self._search_params(selector))
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, len(allowed)))
        if len(short):
            scores[short], ids[short] = self._exact(queries[short], k, allowed)
        return scores, ids

    def _search_all(self, queries: FloatMatrix, k: int) -> SearchResult:
        gpu = self._gpu_copy()
        if gpu is not None:
            scores, ids = gpu.search(queries, k)
            return scores, ids
        if self._kind is IndexType.flat and len(queries) >= BLAS_MIN_QUERIES:
            return self._flat_blas(queries, k)
        if not len(self._deleted):
            scores, ids = self._index.search(queries, k, params=self._search_params(None))
            return scores, ids
        deleted = faiss.IDSelectorBatch(self._deleted)
        scores, ids = self._index.search(queries, k, params=self._search_params(faiss.IDSelectorNot(deleted)))
        return scores, ids

    def _search_params(self, selector: Any) -> Any:
        """Per-call parameters (FAISS's stubs lack the IVF and HNSW kinds)."""
        params: Any
        if self._kind is IndexType.ivf:
            params = faiss.SearchParametersIVF()  # type: ignore[attr-defined]
            params.nprobe = self.params.nprobe
        elif self._kind is IndexType.hnsw:
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(self.params.ef_search, 1)
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        return params

    def _flat_blas(self, queries: FloatMatrix, k: int) -> SearchResult:
        """Exact search of a batch: block matrix products (NumPy) into FAISS's top-k heaps."""
        flat: Any = faiss.downcast_index(self._index.index)
        count = int(flat.ntotal)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), count * self.dimension).reshape(count, self.dimension)
        heap: Any = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start in range(0, count, BLAS_BLOCK):
            block = np.ascontiguousarray(queries @ vectors[start : start + BLAS_BLOCK].T)
            heap.heaps.addn(block.shape[1], faiss.swig_ptr(block), start)
        heap.finalize()
        positions: IdArray = heap.I
        id_map = faiss.vector_to_array(self._index.id_map)
        return heap.D, np.where(positions >= 0, id_map[positions], -1)

    def _exact(self, queries: FloatMatrix, k: int, allowed: IdArray) -> SearchResult:
        """Exact search over the vectors of ``allowed``."""
        scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if len(allowed):
            vectors = self._index.reconstruct_batch(allowed)
            top = min(k, len(allowed))
            scores[:, :top], positions = faiss.knn(queries, vectors, top, metric=faiss.METRIC_INNER_PRODUCT)
            ids[:, :top] = allowed[positions]
        return scores, ids

    def _gpu_copy(self) -> Any:
        """The GPU copy of a Flat or IVF index, made after the last write; None without a GPU."""
        if self._gpu_resources is None or self._kind is IndexType.hnsw:
            return None
        with self._gpu_lock:
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            return self._gpu_index

    # --- snapshots ----------------------------------------------------------------------------

    def save(self, path: Path, revision: int) -> None:
        """Write a snapshot that records the store ``revision`` it reflects."""
        header = {"kind": self._kind.value, "dimension": self.dimension, "revision": revision, "count": len(self)}

        def write(stream: PayloadWriter) -> None:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(stream.write))  # type: ignore[attr-defined]

        write_snapshot(path, header, write)

    @classmethod
    def load(
        cls, path: Path, dimension: int, index_type: IndexType = IndexType.auto, params: DenseParams | None = None
    ) -> tuple[DenseIndex, int]:
        """The index saved at ``path`` and the revision it reflects; `SnapshotError` if unusable.

        Tombstones are not saved: the removed ids are back in the index and leave again when it
        is reconciled with the store.
        """

        def read(stream: PayloadReader) -> Any:
            return faiss.read_index(faiss.PyCallbackIOReader(stream.read))  # type: ignore[attr-defined]

        header, index = read_snapshot(path, read)
        dense = cls(dimension, index_type, params)
        kind = IndexType(header["kind"])
        if header["dimension"] != dimension or index.d != dimension or kind is IndexType.auto:
            raise SnapshotError(f"{path} holds a {header['dimension']}-d {kind} index, not {dimension}-d")
        dense._configure(index, kind)
        dense._index, dense._kind = index, kind
        return dense, snapshot_revision(path, header)

"""`Collection`: one collection's store and derived indexes behind one readers-writer lock.

A write commits to SQLite first (the acknowledgement point), then applies the same change to
the FAISS and BM25 indexes, all under the write lock, so a search (under the read lock) sees
every index at the same revision as the store. Index snapshots are written every
``snapshot_interval_s`` (after a write) and on `close`. On `open`, each index is loaded from its
snapshot (or started empty if the file is missing or corrupt) and reconciled with the store by
chunk id: chunk ids are never reused, so the ids the store has and an index lacks are added, and
the ids an index has and the store lacks are removed. A restart therefore serves exactly what
was committed before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import CollectionCreate, Document, Filter
from tritonrag.server.config import Bm25Params, DenseParams
from tritonrag.server.retrieval.dense import DenseIndex
from tritonrag.server.retrieval.filters import compile_filter
from tritonrag.server.retrieval.locks import ReadWriteLock
from tritonrag.server.retrieval.snapshot import TMP_SUFFIX, SnapshotError
from tritonrag.server.retrieval.sparse import SparseIndex
from tritonrag.server.store.documents import (
    Change,
    ChunkSpan,
    DocumentStore,
    IdArray,
    PreparedDocument,
    StoredChunk,
    stored_dimension,
)

# The types of this interface that live in the store are part of it too.
__all__ = ["ChunkSpan", "Collection", "CollectionStats", "PreparedDocument", "ScoredChunk", "StoredChunk"]

logger = logging.getLogger(__name__)

STORE_FILE = "store.sqlite"
DENSE_FILE = "dense.faiss"
SPARSE_FILE = "sparse.bm25"
T = TypeVar("T")


class ScoredChunk(NamedTuple):
    """One search hit: a chunk id and its score (cosine for dense, BM25 for sparse)."""

    chunk_id: int
    score: float


@dataclass(frozen=True, slots=True)
class CollectionStats:
    """Counts and sizes of a collection; ``active_index`` is the FAISS kind in use."""

    documents: int
    chunks: int
    size_bytes: int
    revision: int
    active_index: str


class Collection:
    """Documents, chunks and vectors of one collection, searchable by vector and by BM25.

    All methods are synchronous and thread-safe; call them from async code with ``asyncio.to_thread``.
    """

    def __init__(
        self,
        directory: Path,
        spec: CollectionCreate,
        store: DocumentStore,
        dense: DenseIndex,
        sparse: SparseIndex,
        snapshot_interval_s: float,
    ) -> None:
        """Use `open`."""
        self.directory = directory
        self.spec = spec
        self._store = store
        self._dense = dense
        self._sparse = sparse
        self._snapshot_interval_s = snapshot_interval_s
        self._lock = ReadWriteLock()
        self._snapshot_lock = threading.Lock()
        self._saved_revision = -1
        self._last_snapshot = time.monotonic()

    @classmethod
    def open(
        cls,
        directory: Path,
        spec: CollectionCreate,
        dimension: int,
        *,
        dense_params: DenseParams | None = None,
        bm25_params: Bm25Params | None = None,
        snapshot_interval_s: float = 60.0,
    ) -> Collection:
        """Open (or create) the collection stored in ``directory`` for ``dimension``-wide vectors."""
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()
        store = DocumentStore(directory / STORE_FILE, dimension)
        dense_path, sparse_path = directory / DENSE_FILE, directory / SPARSE_FILE
        dense, dense_revision = _load_or_empty(
            lambda: DenseIndex.load(dense_path, dimension, spec.index_type, dense_params),
            lambda: DenseIndex(dimension, spec.index_type, dense_params),
        )
        sparse, sparse_revision = _load_or_empty(
            lambda: SparseIndex.load(sparse_path, bm25_params), lambda: SparseIndex(bm25_params)
        )
        collection = cls(directory, spec, store, dense, sparse, snapshot_interval_s)
        changed = collection._reconcile()
        if not changed and dense_revision == sparse_revision == store.revision:
            collection._saved_revision = store.revision
        collection.snapshot()
        return collection

    @staticmethod
    def stored_dimension(directory: Path) -> int | None:
        """The vector width of the collection stored in ``directory``; None when it has no store yet."""
        return stored_dimension(directory / STORE_FILE)

    @property
    def name(self) -> str:
        """The collection's name."""
        return self.spec.name

    @property
    def revision(self) -> int:
        """The number of committed writes; changes with every write (for cache keys)."""
        return self._store.revision

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, documents: Sequence[PreparedDocument]) -> None:
        """Insert or replace ``documents``: each replaces all chunks of its id, atomically."""
        with self._lock.write():
            self._apply(self._store.upsert(documents))
        self._snapshot_if_due()

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Delete the documents ``doc_ids``; returns how many existed."""
        with self._lock.write():
            change = self._store.delete(doc_ids)
            self._apply(change)
        self._snapshot_if_due()
        return change.documents

    def delete_by_filter(self, filter: Filter) -> int:
        """Delete the documents whose metadata matches ``filter``; returns how many."""
        query = compile_filter(filter)
        with self._lock.write():
            change = self._store.delete_where(query)
            self._apply(change)
        self._snapshot_if_due()
        return change.documents

    def _apply(self, change: Change) -> None:
        self._dense.remove(change.removed)
        self._sparse.remove(change.removed)
        self._dense.add(change.added, change.vectors)
        self._sparse.add(change.added, change.texts)
        if self._dense.needs_rebuild():
            self._dense.rebuild(self._store)

    def _reconcile(self) -> bool:
        """Bring both indexes to the store's chunk ids; returns whether anything changed."""
        with self._lock.write():
            stored = self._store.chunk_ids()
            missing, extra = _difference(stored, self._dense.ids())
            self._dense.remove(extra)
            for ids, vectors in self._store.iter_vectors(missing):
                self._dense.add(ids, vectors)
            rebuild = self._dense.needs_rebuild()
            if rebuild:
                self._dense.rebuild(self._store)
            sparse_missing, sparse_extra = _difference(stored, self._sparse.ids())
            self._sparse.remove(sparse_extra)
            for ids, texts in self._store.iter_texts(sparse_missing):
                self._sparse.add(ids, texts)
        counts = [len(missing), len(extra), len(sparse_missing), len(sparse_extra)]
        if any(counts) or rebuild:
            logger.info(
                "collection %s reconciled with its store at revision %d: dense +%d -%d, sparse +%d -%d%s",
                self.name,
                self._store.revision,
                *counts,
                f", rebuilt as {self._dense.kind}" if rebuild else "",
            )
        return any(counts) or rebuild

    # --- reads --------------------------------------------------------------------------------

    def get(self, doc_id: str) -> Document:
        """The document ``doc_id``; `NotFoundError` if there is none."""
        return self._store.get(doc_id)

    def search_dense(self, vector: npt.NDArray[np.float32], k: int, filter: Filter | None = None) -> list[ScoredChunk]:
        """The ``k`` chunks nearest to ``vector`` by cosine, among those matching ``filter``."""
        query = None if filter is None else compile_filter(filter)
        with self._lock.read():
            allowed = None if query is None else self._store.chunk_ids(query)
            scores, ids = self._dense.search(np.asarray(vector, np.float32).reshape(1, -1), k, allowed)
        return [ScoredChunk(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def search_sparse(self, query: str, k: int, filter: Filter | None = None) -> list[ScoredChunk]:
        """The ``k`` best chunks for ``query`` by BM25, among those matching ``filter``."""
        doc_query = None if filter is None else compile_filter(filter)
        with self._lock.read():
            allowed = None if doc_query is None else self._store.chunk_ids(doc_query)
            scores, ids = self._sparse.search(query, k, allowed)
        return [ScoredChunk(int(i), float(s)) for s, i in zip(scores, ids, strict=True)]

    def chunks(self, chunk_ids: Sequence[int]) -> list[StoredChunk]:
        """The chunks ``chunk_ids`` (text, offsets, metadata, vector) in that order; missing ids are left out."""
        return self._store.chunks(chunk_ids)

    def info(self) -> CollectionStats:
        """Counts, size on disk, revision and active index kind."""
        with self._lock.read():
            documents, chunks = self._store.counts()
            revision, kind = self._store.revision, self._dense.kind.value
        size = sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())
        return CollectionStats(documents, chunks, size, revision, kind)

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Write both index snapshots now, unless they already reflect the store's revision."""
        with self._snapshot_lock, self._lock.read():
            self._save()

    def _snapshot_if_due(self) -> None:
        if time.monotonic() - self._last_snapshot >= self._snapshot_interval_s:
            self.snapshot()

    def _save(self) -> None:
        revision = self._store.revision
        if revision != self._saved_revision:
            self._dense.save(self.directory / DENSE_FILE, revision)
            self._sparse.save(self.directory / SPARSE_FILE, revision)
            self._saved_revision = revision
        self._last_snapshot = time.monotonic()

    def close(self) -> None:
        """Write the snapshots and close the store."""
        with self._snapshot_lock, self._lock.write():
            self._save()
            self._store.close()


def _difference(stored: IdArray, indexed: IdArray) -> tuple[IdArray, IdArray]:
    """``(stored but not indexed, indexed but not stored)``, both ascending."""
    return np.setdiff1d(stored, indexed, assume_unique=True), np.setdiff1d(indexed, stored, assume_unique=True)


def _load_or_empty(load: Callable[[], tuple[T, int]], empty: Callable[[], T]) -> tuple[T, int]:
    """The loaded index and its revision, or an empty one (revision -1) if the snapshot is unusable."""
    try:
        return load()
    except FileNotFoundError:
        return empty(), -1
    except SnapshotError as error:
        logger.warning("rebuilding an index from the store: %s", error)
        return empty(), -1

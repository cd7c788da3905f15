"""`Collection`: one collection's store and derived indexes behind one readers-writer lock.

The derived indexes: FAISS over chunk vectors, BM25 over chunk texts, and BM25 over whole documents
(keyed by each document's first chunk id). Writes run one at a time. A write's change is made in an
SQLite transaction and committed to the lexical indexes while searches go on; then, under the write
lock, the SQLite commit (the acknowledgement point), the change to FAISS, and the lexical commits and
new revision made what searches see: a search (under the read lock) sees the store and every index at
one revision, and waits for milliseconds rather than for the lexical indexes' file syncs. A crash
between the commits leaves ids that reconciliation removes. FAISS snapshots are written every
``snapshot_interval_s`` (after a write) and on `close`. On `open`, FAISS is loaded from its snapshot
(or started empty if the file is missing or corrupt), the lexical indexes from their directories (or
started empty if unreadable), and each is reconciled with the store by id: chunk ids are never reused
(so neither are document keys), so the ids the store has and an index lacks are added, and the ids an
index has and the store lacks are removed. A restart therefore serves exactly what was committed
before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import CollectionCreate, Document, Filter
from tritonrag.server.config import DenseParams
from tritonrag.server.retrieval.dense import DenseIndex
from tritonrag.server.retrieval.filters import compile_filter
from tritonrag.server.retrieval.lexical import LexicalIndex
from tritonrag.server.retrieval.locks import ReadWriteLock
from tritonrag.server.retrieval.snapshot import TMP_SUFFIX, SnapshotError
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
LEXICAL_DIR = "lexical"
DOCUMENTS_DIR = "lexical-documents"  # BM25 over whole documents, keyed by their first chunk's id
FORMER_SPARSE_FILE = "sparse.bm25"  # the lexical snapshot of earlier versions, rebuilt as LEXICAL_DIR
T = TypeVar("T")


class ScoredChunk(NamedTuple):
    """One search hit: a chunk id and its score (cosine for dense, BM25 for sparse, the lexical index)."""

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
    """Documents, chunks and vectors of one collection, searchable by vector and by BM25 (lexical).

    All methods are synchronous and thread-safe; call them from async code with ``asyncio.to_thread``.
    """

    def __init__(
        self,
        directory: Path,
        spec: CollectionCreate,
        store: DocumentStore,
        dense: DenseIndex,
        lexical: LexicalIndex,
        documents: LexicalIndex,
        snapshot_interval_s: float,
    ) -> None:
        """Use `open`."""
        self.directory = directory
        self.spec = spec
        self._store = store
        self._dense = dense
        self._lexical = lexical
        self._documents = documents
        self._snapshot_interval_s = snapshot_interval_s
        self._lock = ReadWriteLock()
        self._revision = store.revision
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
        snapshot_interval_s: float = 60.0,
    ) -> Collection:
        """Open (or create) the collection stored in ``directory`` for ``dimension``-wide vectors."""
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()
        store = DocumentStore(directory / STORE_FILE, dimension)
        dense_path = directory / DENSE_FILE
        (directory / FORMER_SPARSE_FILE).unlink(missing_ok=True)
        dense, dense_revision = _load_or_empty(
            lambda: DenseIndex.load(dense_path, dimension, spec.index_type, dense_params),
            lambda: DenseIndex(dimension, spec.index_type, dense_params),
        )
        lexical = LexicalIndex.open_or_empty(directory / LEXICAL_DIR, spec.language)
        documents = LexicalIndex.open_or_empty(directory / DOCUMENTS_DIR, spec.language)
        collection = cls(directory, spec, store, dense, lexical, documents, snapshot_interval_s)
        changed = collection._reconcile()
        if not changed and dense_revision == store.revision:
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
        """The number of writes that searches see; changes with every write (for cache keys: a write is
        counted once its chunks are searchable, so no key is newer than the results it names)."""
        return self._revision

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, documents: Sequence[PreparedDocument]) -> None:
        """Insert or replace ``documents``: each replaces all chunks of its id, atomically."""
        self._store.upsert(documents, self._publishing)
        self._snapshot_if_due()

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Delete the documents ``doc_ids``; returns how many existed."""
        change = self._store.delete(doc_ids, self._publishing)
        self._snapshot_if_due()
        return change.documents

    def delete_by_filter(self, filter: Filter) -> int:
        """Delete the documents whose metadata matches ``filter``; returns how many."""
        change = self._store.delete_where(compile_filter(filter), self._publishing)
        self._snapshot_if_due()
        return change.documents

    @contextmanager
    def _publishing(self, change: Change) -> Iterator[None]:
        """Around the store's commit of ``change`` (writes come one at a time, the store's own lock):
        first the lexical indexes' commits, while searches go on (tens of ms of file syncs); then, under
        the write lock, the store's commit, FAISS, and what searches see (the lexical commits, the
        revision). A failed store commit brings the lexical indexes back to the store."""
        self._lexical.write(change.removed, change.added, change.texts)
        self._documents.write(change.removed, change.document_keys, change.document_texts)
        with self._lock.write():
            try:
                yield
            except BaseException:
                self._reconcile_lexical()
                raise
            self._dense.remove(change.removed)
            self._dense.add(change.added, change.vectors)
            if self._dense.needs_rebuild():
                self._dense.rebuild(self._store)
            self._lexical.refresh()
            self._documents.refresh()
            self._revision = change.revision

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
            lexical = self._reconcile_lexical()
            self._revision = self._store.revision
        counts = [len(missing), len(extra), *(len(ids) for ids in lexical)]
        if any(counts) or rebuild:
            logger.info(
                "collection %s reconciled with its store at revision %d: dense +%d -%d, lexical +%d -%d, "
                "documents +%d -%d%s",
                self.name,
                self._store.revision,
                *counts,
                f", rebuilt as {self._dense.kind}" if rebuild else "",
            )
        return any(counts) or rebuild

    def _reconcile_lexical(self) -> tuple[IdArray, IdArray, IdArray, IdArray]:
        """Bring both lexical indexes to the store (chunks by id, documents by key); returns the chunk ids
        added and removed, then the document keys added and removed."""
        chunks = _sync(self._lexical, self._store.chunk_ids(), self._store.iter_texts)
        documents = _sync(self._documents, self._store.document_keys(), self._store.iter_document_texts)
        return (*chunks, *documents)

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
            scores, ids = self._lexical.search(query, k, allowed)
        return [ScoredChunk(int(i), float(s)) for s, i in zip(scores, ids, strict=True)]

    def search_documents(self, query: str, k: int, filter: Filter | None = None) -> dict[str, float]:
        """The ``k`` best documents for ``query`` by BM25 of their whole text, among those matching ``filter``:
        document id → score."""
        doc_query = None if filter is None else compile_filter(filter)
        with self._lock.read():
            allowed = None if doc_query is None else self._store.chunk_ids(doc_query)
            scores, keys = self._documents.search(query, k, allowed)
            owners = self._store.document_of(keys)
        return {owners[int(key)]: float(score) for score, key in zip(scores, keys, strict=True) if int(key) in owners}

    def documents_of(self, chunk_ids: Sequence[int]) -> dict[int, str]:
        """The document id of each of ``chunk_ids`` that is stored."""
        return self._store.document_of(chunk_ids)

    def chunks(self, chunk_ids: Sequence[int]) -> list[StoredChunk]:
        """The chunks ``chunk_ids`` (text, offsets, metadata, vector) in that order; missing ids are left out."""
        return self._store.chunks(chunk_ids)

    def info(self) -> CollectionStats:
        """Counts, size on disk, revision and active index kind."""
        with self._lock.read():
            documents, chunks = self._store.counts()
            revision, kind = self._revision, self._dense.kind.value
        size = sum(path.stat().st_size for path in self.directory.rglob("*") if path.is_file())
        return CollectionStats(documents, chunks, size, revision, kind)

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Write the FAISS snapshot now, unless it already reflects the store's revision (the lexical index
        is on disk at every write)."""
        with self._snapshot_lock, self._lock.read():
            self._save()

    def _snapshot_if_due(self) -> None:
        if time.monotonic() - self._last_snapshot >= self._snapshot_interval_s:
            self.snapshot()

    def _save(self) -> None:
        revision = self._revision
        if revision != self._saved_revision:
            self._dense.save(self.directory / DENSE_FILE, revision)
            self._saved_revision = revision
        self._last_snapshot = time.monotonic()

    def close(self) -> None:
        """Write the snapshot and close the store. The store closes outside the write lock: a write holds the
        store's lock while it waits for the write lock to publish, so closing under both would deadlock with a
        write in flight (an ingestion job's, when its collection is deleted)."""
        with self._snapshot_lock, self._lock.write():
            self._save()
        self._store.close()


def _sync(
    index: LexicalIndex, stored: IdArray, texts: Callable[[IdArray], Iterator[tuple[IdArray, list[str]]]]
) -> tuple[IdArray, IdArray]:
    """Bring ``index`` to the ``stored`` ids, reading the missing texts by ``texts``; returns the ids added
    and removed."""
    missing, extra = _difference(stored, index.ids())
    removed = extra
    for ids, batch in texts(missing):  # a batch at a time: a rebuild never holds every text at once
        index.write(removed, ids, batch)
        removed = np.empty(0, np.int64)
    if len(removed):
        index.write(removed, removed[:0], [])
    index.refresh()
    return missing, extra


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

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

A collection is pinned to the embedder version that made its vectors (`embedder`). A blue/green
re-index to another version fills the store's next vectors (`begin_reindex`, `add_next`) while
searches and writes go on with the pinned version; `switch_embedder` builds the next FAISS index
beside the live one, then commits the store's switch (vectors, width and pinned version in one
transaction) and swaps the dense index and the pinned version under the write lock, so a search
sees one version throughout. A FAISS snapshot older than the last switch holds the former
version's vectors and is rebuilt from the store on `open`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import CollectionCreate, Document, Filter, ModelVersion
from tritonrag.server.config import DenseParams
from tritonrag.server.retrieval.dense import DenseIndex, VectorSource
from tritonrag.server.retrieval.filters import compile_filter
from tritonrag.server.retrieval.lexical import LexicalIndex
from tritonrag.server.retrieval.locks import ReadWriteLock
from tritonrag.server.retrieval.snapshot import TMP_SUFFIX, SnapshotError
from tritonrag.server.store.database import Database, StoreLocation
from tritonrag.server.store.documents import (
    Change,
    ChunkSpan,
    DocumentStore,
    EmbedderChangedError,
    FloatMatrix,
    IdArray,
    LoggedRevision,
    PreparedDocument,
    StoredChunk,
    stored_dimension,
)

# The types of this interface that live in the store are part of it too.
__all__ = [
    "ChunkSpan",
    "Collection",
    "CollectionStats",
    "EmbedderChangedError",
    "PreparedDocument",
    "ReindexProgress",
    "ScoredChunk",
    "StoredChunk",
]

logger = logging.getLogger(__name__)

STORE_FILE = "store.sqlite"
_FOLLOW_BATCH = 256  # revision log entries read at a time
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


@dataclass(frozen=True, slots=True)
class ReindexProgress:
    """Where a re-index stands: the first chunks without a next vector (``pending``), how many have none, and
    how many chunks there are."""

    pending: IdArray
    missing: int
    total: int


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
        self._embedder = store.embedder
        self._next: tuple[ModelVersion, DenseIndex] | None = None  # the re-index's FAISS index, once built
        self._next_lock = threading.Lock()
        self._follow_lock = threading.Lock()  # the indexes move one revision at a time, by writes or by `follow`
        self._closed = False

    @classmethod
    def open(
        cls,
        directory: Path,
        spec: CollectionCreate,
        dimension: int,
        *,
        dense_params: DenseParams | None = None,
        snapshot_interval_s: float = 60.0,
        location: StoreLocation | None = None,
    ) -> Collection:
        """Open (or create) the collection whose derived indexes are in ``directory`` for ``dimension``-wide vectors;
        its store is in ``directory`` too, or in the shared database of ``location``."""
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()
        store = DocumentStore(_database(location, directory, spec.name), dimension)
        dense_path = directory / DENSE_FILE
        (directory / FORMER_SPARSE_FILE).unlink(missing_ok=True)
        dense, dense_revision = _load_or_empty(
            lambda: DenseIndex.load(dense_path, dimension, spec.index_type, dense_params),
            lambda: DenseIndex(dimension, spec.index_type, dense_params),
        )
        if dense_revision < store.vectors_revision:  # from before a re-index's switch: the former version's vectors
            dense, dense_revision = DenseIndex(dimension, spec.index_type, dense_params), -1
        lexical = LexicalIndex.open_or_empty(directory / LEXICAL_DIR, spec.language)
        documents = LexicalIndex.open_or_empty(directory / DOCUMENTS_DIR, spec.language)
        collection = cls(directory, spec, store, dense, lexical, documents, snapshot_interval_s)
        changed = collection._reconcile()
        if not changed and dense_revision == store.revision:
            collection._saved_revision = store.revision
        collection.snapshot()
        return collection

    @staticmethod
    def stored_dimension(directory: Path, name: str, location: StoreLocation | None = None) -> int | None:
        """The vector width of the collection ``name`` (stored in ``directory``, or in ``location``'s shared
        database); None when it has no store yet."""
        database = _database(location, directory, name)
        try:
            return stored_dimension(database)
        finally:
            database.close()

    @property
    def name(self) -> str:
        """The collection's name."""
        return self.spec.name

    @property
    def embedder(self) -> ModelVersion | None:
        """The embedder version that made the vectors searches use; None until the collection is pinned."""
        return self._embedder

    @property
    def closed(self) -> bool:
        """Whether the collection was closed (deleted, or the registry closed)."""
        return self._closed

    def pin(self, embedder: ModelVersion) -> ModelVersion:
        """Pin an unpinned collection to ``embedder``; returns the version it is pinned to (an earlier pin stays)."""
        self._embedder = self._store.pin(embedder)
        return self._embedder

    @property
    def revision(self) -> int:
        """The number of writes that searches see; changes with every write (for cache keys: a write is
        counted once its chunks are searchable, so no key is newer than the results it names)."""
        return self._revision

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, documents: Sequence[PreparedDocument], embedder: ModelVersion | None = None) -> int:
        """Insert or replace ``documents``: each replaces all chunks of its id, atomically; returns the write's
        revision (searches see it once this returns). ``embedder`` made their vectors: it pins an unpinned
        collection, and `EmbedderChangedError` says the collection is pinned to another version (a re-index
        switched it): embed again."""
        change = self._store.upsert(documents, self._publishing, embedder)
        self._snapshot_if_due()
        return change.revision

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
        first the writes other processes committed before it (`follow`), then the lexical indexes' commits,
        while searches go on (tens of ms of file syncs); then, under the write lock, the store's commit,
        FAISS, and what searches see (the lexical commits, the revision). A failed store commit brings the
        lexical indexes back to the store."""
        with self._follow_lock:
            self._catch_up(change.revision - 1)
            self._lexical.write(change.removed, change.added, change.texts)
            self._documents.write(change.removed, change.document_keys, change.document_texts)
            with self._lock.write():
                try:
                    yield
                except BaseException:
                    self._reconcile_lexical()
                    raise
                self._make_searchable(change.revision, change.removed, change.added, change.vectors)

    # --- re-index -----------------------------------------------------------------------------

    def begin_reindex(self, embedder: ModelVersion, dimension: int, limit: int) -> ReindexProgress:
        """Make ``embedder`` (``dimension`` wide) the target of the next vectors (keeping those already made for
        it); returns the progress, with up to ``limit`` chunks that have no next vector yet."""
        self._store.begin_next(embedder, dimension)
        pending, missing = self._store.missing_next(limit)
        return ReindexProgress(pending, missing, self._store.chunk_count())

    def texts(self, chunk_ids: IdArray) -> tuple[IdArray, list[str]]:
        """The stored ones of ``chunk_ids`` (ascending) and their texts as embedded (after their document's
        header, as at ingestion)."""
        batches = list(self._store.iter_texts(chunk_ids))
        ids = np.concatenate([ids for ids, _ in batches]) if batches else np.empty(0, np.int64)
        return ids, [text for _, texts in batches for text in texts]

    def add_next(self, embedder: ModelVersion, chunk_ids: IdArray, vectors: npt.ArrayLike) -> int:
        """Store the next vectors ``embedder`` made of ``chunk_ids``; returns how many were stored (a deleted
        chunk's are not). `EmbedderChangedError` when the re-index targets another version."""
        return len(self._store.put_next(embedder, chunk_ids, vectors))

    def switch_embedder(self, embedder: ModelVersion, dimension: int) -> bool:
        """Swap the vectors for the next ones made by ``embedder``: build their FAISS index beside the live one
        (kept for the next try), then commit the store's switch and publish the index and the pinned version
        under the write lock, and snapshot. False, changing nothing, while a chunk has no next vector (written
        since: catch up and try again)."""
        with self._next_lock:
            if self._next is None or self._next[0] != embedder:
                dense = DenseIndex(dimension, self.spec.index_type, self._dense.params)
                dense.rebuild(self._store.next_vectors())
                self._next = (embedder, dense)
            dense = self._next[1]
            with self._snapshot_lock:
                if self._store.switch(embedder, partial(self._switching, dense, embedder)) is None:
                    return False
                self._next = None
                with self._lock.read():
                    self._save()
        logger.info("collection %s switched to %s %s", self.name, embedder.name, embedder.version)
        return True

    @contextmanager
    def _switching(self, dense: DenseIndex, embedder: ModelVersion, change: Change) -> Iterator[None]:
        """Around the store's switch: bring ``dense`` to the store's chunks (writes wait on the store's lock,
        searches go on), then commit and publish it with ``embedder`` under the write lock."""
        self._sync_dense(dense, self._store.next_vectors())
        with self._follow_lock:
            self._catch_up(change.revision - 1)
            with self._lock.write():
                yield
                self._dense, self._embedder, self._revision = dense, embedder, change.revision

    # --- following the store ------------------------------------------------------------------

    def follow(self, until: int | None = None) -> int:
        """Apply what other processes (orchestrator replicas, workers) committed to a shared store since the
        revision searches see, in the revision log's order, up to ``until`` (all when None); returns the revision
        searches see now."""
        with self._follow_lock:
            self._catch_up(until)
        return self._revision

    def _catch_up(self, until: int | None) -> None:
        """With ``_follow_lock``: apply the log's entries after the revision searches see, up to ``until``."""
        while until is None or self._revision < until:
            entries = [
                entry
                for entry in self._store.changes_since(self._revision, _FOLLOW_BATCH)
                if until is None or entry.revision <= until
            ]
            if not entries:
                return
            self._store.refresh()
            for entry in entries:
                self._apply(entry)

    def _apply(self, entry: LoggedRevision) -> None:
        """Bring the indexes from ``entry.revision - 1`` to ``entry.revision``. Idempotent: an index skips the ids
        it has, and reads what the entry added as the store holds it now (chunks removed since are gone, and a
        later entry removes them)."""
        if entry.kind == "switch":  # every vector replaced: a new dense index, from the store
            dense = DenseIndex(self._store.dimension, self.spec.index_type, self._dense.params)
            dense.rebuild(self._store)
            with self._lock.write():
                self._dense, self._embedder, self._revision = dense, self._store.embedder, entry.revision
            return
        chunk_ids, texts = self.texts(entry.added)
        key_batches = list(self._store.iter_document_texts(entry.added))
        keys = np.concatenate([np.empty(0, np.int64), *(batch for batch, _ in key_batches)])
        self._lexical.write(np.union1d(entry.removed, chunk_ids), chunk_ids, texts)
        self._documents.write(np.union1d(entry.removed, keys), keys, [t for _, batch in key_batches for t in batch])
        batches = list(self._store.iter_vectors(entry.added))
        with self._lock.write():
            present, width = self._dense.ids(), self._dense.dimension
            ids_parts, vector_parts = [np.empty(0, np.int64)], [np.empty((0, width), np.float32)]
            for ids, vectors in batches:
                if vectors.shape[1] == width:  # else a switch made since, which a later entry applies (a rebuild)
                    new = ~np.isin(ids, present)
                    ids_parts.append(ids[new])
                    vector_parts.append(vectors[new])
            removed = np.intersect1d(entry.removed, present, assume_unique=True)
            self._make_searchable(entry.revision, removed, np.concatenate(ids_parts), np.concatenate(vector_parts))

    def _make_searchable(self, revision: int, removed: IdArray, added: IdArray, vectors: FloatMatrix) -> None:
        """Under the write lock, once the lexical indexes have committed ``revision``: move FAISS to it, and searches
        to the lexical commits and the revision (and the pinned version: a first ingest pins)."""
        self._dense.remove(removed)
        self._dense.add(added, vectors)
        if self._dense.needs_rebuild():
            self._dense.rebuild(self._store)
        self._lexical.refresh()
        self._documents.refresh()
        self._revision, self._embedder = revision, self._store.embedder

    # --- reconciliation -----------------------------------------------------------------------

    def _sync_dense(self, dense: DenseIndex, source: VectorSource) -> tuple[IdArray, IdArray, bool]:
        """Bring ``dense`` to the store's chunk ids with the vectors of ``source``; returns the ids added and
        removed, and whether it was rebuilt."""
        missing, extra = _difference(self._store.chunk_ids(), dense.ids())
        dense.remove(extra)
        for ids, vectors in source.iter_vectors(missing):
            dense.add(ids, vectors)
        rebuild = dense.needs_rebuild()
        if rebuild:
            dense.rebuild(source)
        return missing, extra, rebuild

    def _reconcile(self) -> bool:
        """Bring both indexes to the store's chunk ids; returns whether anything changed."""
        with self._lock.write():
            missing, extra, rebuild = self._sync_dense(self._dense, self._store)
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

    def holds_phrase(self, query: str, filter: Filter | None = None) -> bool:
        """Whether some chunk matching ``filter`` holds the query's words in order (`LexicalIndex.holds_phrase`)."""
        doc_query = None if filter is None else compile_filter(filter)
        with self._lock.read():
            allowed = None if doc_query is None else self._store.chunk_ids(doc_query)
            return self._lexical.holds_phrase(query, allowed)

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
            self._closed = True
        self._store.close()

    def drop_store(self) -> None:
        """After `close`: drop the store's tables where its directory does not hold them (a shared database)."""
        self._store.drop()


def _database(location: StoreLocation | None, directory: Path, name: str) -> Database:
    return (location or StoreLocation()).database(directory / STORE_FILE, name)


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

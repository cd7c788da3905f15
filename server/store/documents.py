"""`DocumentStore`: one collection's ``store.sqlite``, the source of truth.

Documents, their metadata, their chunks (text, offsets, float32 vector) and a revision
counter that every committed write bumps. The FAISS and lexical indexes are derived from it.
A write is one SQLite transaction; its commit is the acknowledgement point, and the caller may
wrap it (``publish``) to move its derived indexes with it.

The store is pinned to the embedder version that made its vectors (``meta.embedder``). A re-index
to another version fills ``next_vectors`` side by side with the live vectors (``begin_next``,
``put_next``), while writes go on with the pinned version; `switch` then replaces the vectors, their
width and the pinned version in one transaction, once every chunk has its next vector. Until that
commit the live vectors are untouched, so a crash at any point leaves the store serving the old
version, or (after it) the new one.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tritonrag.clients.wire.schema import Document, DocumentIn, Metadata, ModelVersion
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.sqlite import connect, transaction

FloatMatrix = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
SqlValue = str | int | float

# Chunk ids are never reused (AUTOINCREMENT), so a chunk id names one immutable text and vector
# forever: a derived index is brought up to date by the difference of its id set and the store's.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    updated_at REAL NOT NULL,
    header TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, chunk_id);
CREATE TABLE IF NOT EXISTS chunk_content (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(chunk_id) ON DELETE CASCADE,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS doc_metadata (
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    value NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_metadata_lookup ON doc_metadata(key, kind, value, doc_id);
CREATE INDEX IF NOT EXISTS doc_metadata_by_doc ON doc_metadata(doc_id);
CREATE TABLE IF NOT EXISTS next_vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(chunk_id) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
UPDATE meta SET key = 'revision' WHERE key = 'generation';  -- the counter's name before 0.2
INSERT OR IGNORE INTO meta(key, value) VALUES ('revision', 0);
"""
_CONTENT_QUERIES = {
    "vector": "SELECT cc.chunk_id, cc.vector FROM chunk_content cc",
    "next": "SELECT cc.chunk_id, cc.vector FROM next_vectors cc",
    "text": "SELECT cc.chunk_id, cc.text, d.header FROM chunk_content cc JOIN chunks c USING (chunk_id) "
    "JOIN documents d USING (doc_id)",
}
_INT64_MAX = 2**63 - 1
_READ_BATCH = 8192
_MISSING_NEXT = "SELECT chunk_id FROM chunks WHERE chunk_id NOT IN (SELECT chunk_id FROM next_vectors)"
Side = Literal["vector", "next"]  # the live vectors, or a re-index's next vectors
Content = Literal["vector", "next", "text"]


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a document: ``text == document.text[start:end]``."""

    text: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class PreparedDocument:
    """A document ready to store: its chunks, one vector per chunk, ``(len(chunks), dimension)``, and the header
    its chunks were embedded with (see `with_header`)."""

    document: DocumentIn
    chunks: Sequence[ChunkSpan]
    vectors: FloatMatrix
    header: str = ""


def with_header(header: str, text: str) -> str:
    """A chunk's (or document's) text as it is embedded and indexed: after its document's header line, unless
    there is none or the text already starts with it (a document's first chunk, under a first-line header)."""
    if not header or " ".join(text[: 2 * len(header) + 16].split()).startswith(header):
        return text
    return f"{header}\n{text}"


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as stored, with its document's id and metadata."""

    chunk_id: int
    doc_id: str
    text: str
    start: int
    end: int
    metadata: Metadata
    vector: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Change:
    """What one committed write did, for the derived indexes to apply.

    A document is keyed in the document-level index by its first chunk's id (chunk ids are never
    reused, so a key names one version of one document); ``document_keys`` and ``document_texts`` are
    the added documents that have chunks. Removed keys are among ``removed``.
    """

    revision: int
    documents: int
    removed: IdArray
    added: IdArray
    vectors: FloatMatrix
    texts: Sequence[str]
    document_keys: IdArray
    document_texts: Sequence[str]


Publish = Callable[[Change], AbstractContextManager[object]]


class EmbedderChangedError(Exception):
    """The store is (now) pinned to another embedder version than the one a write's vectors came from, or a
    re-index targets another version than the next vectors offered: the caller embeds again."""


def unpublished(change: Change) -> AbstractContextManager[object]:
    """Commit with nothing around it."""
    return contextlib.nullcontext()


@dataclass(frozen=True, slots=True)
class DocQuery:
    """An SQL ``SELECT doc_id …`` over the store's tables, with its parameters."""

    sql: str
    params: tuple[SqlValue, ...]


def unit_vectors(vectors: npt.ArrayLike, dimension: int, field: str) -> FloatMatrix:
    """``vectors`` as a C-contiguous float32 matrix of L2-normalised rows, ``dimension`` wide."""
    matrix = np.array(vectors, dtype=np.float32, ndmin=2, copy=True, order="C")
    if matrix.ndim != 2 or matrix.shape[1] != dimension:
        raise InvalidArgumentError(f"vectors must be {dimension} wide, got shape {matrix.shape}", field=field)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise InvalidArgumentError("vectors must be finite and non-zero", field=field)
    matrix /= norms
    return matrix


def encode_scalar(value: str | int | float | bool) -> tuple[str, SqlValue]:
    """A metadata scalar as ``(kind, value)`` in ``doc_metadata``: ``s`` text, ``n`` number, ``b`` bool (0/1)."""
    if isinstance(value, bool):
        return "b", int(value)
    if isinstance(value, str):
        return "s", value
    if isinstance(value, int) and abs(value) > _INT64_MAX:
        return "n", float(value)
    return "n", value


def _metadata_rows(doc_id: str, metadata: Metadata) -> Iterator[tuple[str, str, str, SqlValue]]:
    """One row per scalar; a list-valued field gives one row per element."""
    for key, value in metadata.items():
        for element in value if isinstance(value, list) else [value]:
            yield (doc_id, key, *encode_scalar(element))


def _content(column: Content, row: Sequence[Any]) -> Any:
    """A ``_CONTENT_QUERIES`` row's vector blob, or its text as indexed."""
    return with_header(row[2], row[1]) if column == "text" else row[1]


def _ids(values: Sequence[int] | IdArray) -> IdArray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _json_list(values: Sequence[str] | IdArray) -> str:
    return json.dumps(values.tolist() if isinstance(values, np.ndarray) else list(values))


def stored_dimension(path: Path) -> int | None:
    """The vector width a store at ``path`` was created for; None when there is no store yet."""
    if not path.is_file():
        return None
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'dimension'").fetchone()
    return int(row[0]) if row else None


class DocumentStore:
    """One collection's documents, chunks, metadata and vectors in SQLite (WAL).

    Thread-safe: writes are serialised on one connection, reads use a pool of connections.
    Consistency across several calls is the caller's (see `Collection`).
    """

    def __init__(self, path: Path, dimension: int) -> None:
        """Open or create the store at ``path`` for vectors ``dimension`` wide."""
        self.path = path
        self.dimension = dimension
        self._writer = connect(path)
        self._write_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._writer.executescript(_SCHEMA)
        if "header" not in {row[1] for row in self._writer.execute("PRAGMA table_info(documents)")}:
            self._writer.execute("ALTER TABLE documents ADD COLUMN header TEXT NOT NULL DEFAULT ''")  # before 0.3
        with transaction(self._writer) as conn:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('dimension', ?)", (dimension,))
            stored = conn.execute("SELECT value FROM meta WHERE key = 'dimension'").fetchone()[0]
            self._revision: int = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
            self._embedder = _version(conn, "embedder")
            self._vectors_revision = int(_meta(conn, "vectors_revision") or 0)
        if stored != dimension:
            self.close()
            raise InvalidArgumentError(f"{path} holds {stored}-d vectors, not {dimension}-d", field="dimension")

    @property
    def revision(self) -> int:
        """The number of committed writes so far."""
        return self._revision

    @property
    def vectors_revision(self) -> int:
        """The revision of the last `switch` (0 if none): a chunk id names one vector since then only."""
        return self._vectors_revision

    @property
    def embedder(self) -> ModelVersion | None:
        """The embedder version that made the vectors; None until the store is pinned."""
        return self._embedder

    def pin(self, embedder: ModelVersion) -> ModelVersion:
        """Pin an unpinned store to ``embedder``; returns the version it is pinned to (an earlier pin stays)."""
        with self._write_lock, transaction(self._writer) as conn:
            pinned = _version(conn, "embedder") or embedder
            _set_meta(conn, "embedder", pinned.model_dump_json())
        self._embedder = pinned
        return pinned

    @staticmethod
    def _pinned(conn: sqlite3.Connection, embedder: ModelVersion | None) -> ModelVersion | None:
        """In a write transaction: the pinned version, pinning an unpinned store to ``embedder`` when given;
        `EmbedderChangedError` when it is pinned to another."""
        stored = _version(conn, "embedder")
        if embedder is None:
            return stored
        if stored is None:
            _set_meta(conn, "embedder", embedder.model_dump_json())
        elif stored != embedder:
            raise EmbedderChangedError(f"the store is pinned to {stored.name} {stored.version}, not {embedder.version}")
        return embedder

    # --- writes -------------------------------------------------------------------------------

    def upsert(
        self,
        documents: Sequence[PreparedDocument],
        publish: Publish = unpublished,
        embedder: ModelVersion | None = None,
    ) -> Change:
        """Insert or replace ``documents`` (each replaces all chunks of its id) in one transaction, which
        commits within ``publish(change)``. ``embedder``, the version that made the vectors, pins an unpinned
        store; `EmbedderChangedError` when the store is pinned to another (a re-index switched it)."""
        doc_ids = [prepared.document.id for prepared in documents]
        if len(set(doc_ids)) != len(doc_ids):
            raise InvalidArgumentError("a document id appears twice in one upsert", field="documents")
        texts = [with_header(prepared.header, chunk.text) for prepared in documents for chunk in prepared.chunks]
        now = time.time()
        with self._write_lock, transaction(self._writer) as conn:
            pinned = self._pinned(conn, embedder)
            vectors = [self._checked_vectors(prepared) for prepared in documents]  # the width a switch may change
            removed = self._remove_documents(conn, doc_ids)
            conn.executemany(
                "INSERT INTO documents(doc_id, text, metadata, updated_at, header) VALUES (?, ?, ?, ?, ?)",
                [(p.document.id, p.document.text, json.dumps(p.document.metadata), now, p.header) for p in documents],
            )
            conn.executemany(
                "INSERT INTO doc_metadata(doc_id, key, kind, value) VALUES (?, ?, ?, ?)",
                [row for p in documents for row in _metadata_rows(p.document.id, p.document.metadata)],
            )
            first = self._next_chunk_id(conn)
            added = np.arange(first, first + len(texts), dtype=np.int64)
            owners = [p.document.id for p in documents for _ in p.chunks]
            spans = [chunk for p in documents for chunk in p.chunks]
            matrix = np.concatenate(vectors) if vectors else self._no_vectors()
            conn.executemany(
                "INSERT INTO chunks(chunk_id, doc_id) VALUES (?, ?)", zip(added.tolist(), owners, strict=True)
            )
            conn.executemany(
                "INSERT INTO chunk_content(chunk_id, start_char, end_char, text, vector) VALUES (?, ?, ?, ?, ?)",
                [
                    (chunk_id, span.start, span.end, span.text, row.tobytes())
                    for chunk_id, span, row in zip(added.tolist(), spans, matrix, strict=True)
                ],
            )
            counts = np.asarray([len(p.chunks) for p in documents], np.int64)
            keys = added[np.cumsum(counts)[counts > 0] - counts[counts > 0]] if len(added) else _ids([])
            document_texts = [with_header(p.header, p.document.text) for p in documents if p.chunks]
            change = Change(self._bump(conn), len(documents), removed, added, matrix, texts, keys, document_texts)
            self._commit(conn, change, publish, embedder=pinned)
        return change

    def delete(self, doc_ids: Sequence[str], publish: Publish = unpublished) -> Change:
        """Delete the documents ``doc_ids`` (absent ids are ignored) in one transaction, which commits within
        ``publish(change)``."""
        with self._write_lock, transaction(self._writer) as conn:
            found = conn.execute(
                "SELECT doc_id FROM documents WHERE doc_id IN (SELECT value FROM json_each(?))", (_json_list(doc_ids),)
            ).fetchall()
            return self._delete_found(conn, [row[0] for row in found], publish)

    def delete_where(self, query: DocQuery, publish: Publish = unpublished) -> Change:
        """Delete the documents that ``query`` selects, in one transaction, which commits within
        ``publish(change)``."""
        with self._write_lock, transaction(self._writer) as conn:
            found = conn.execute(query.sql, query.params).fetchall()
            return self._delete_found(conn, [row[0] for row in found], publish)

    def _delete_found(self, conn: sqlite3.Connection, doc_ids: list[str], publish: Publish) -> Change:
        removed = self._remove_documents(conn, doc_ids)
        revision = self._bump(conn) if doc_ids else self._revision
        change = Change(revision, len(doc_ids), removed, _ids([]), self._no_vectors(), [], _ids([]), [])
        self._commit(conn, change, publish)
        return change

    def _commit(
        self,
        conn: sqlite3.Connection,
        change: Change,
        publish: Publish,
        dimension: int | None = None,
        embedder: ModelVersion | None = None,
    ) -> None:
        """Commit within ``publish(change)``, which sees the new revision, width and pinned version."""
        with publish(change):
            conn.execute("COMMIT")
            self._revision = change.revision
            self.dimension = dimension or self.dimension
            self._embedder = embedder or self._embedder

    # --- re-index: next vectors side by side ----------------------------------------------------

    def begin_next(self, embedder: ModelVersion, dimension: int) -> None:
        """Make ``embedder`` (``dimension`` wide) the target of the next vectors, keeping those already made for
        it (a resumed re-index) and dropping any made for another target."""
        target = embedder.model_dump_json()
        with self._write_lock, transaction(self._writer) as conn:
            if _version(conn, "next_embedder") != embedder or _meta(conn, "next_dimension") != dimension:
                conn.execute("DELETE FROM next_vectors")
                _set_meta(conn, "next_embedder", target)
                _set_meta(conn, "next_dimension", dimension)

    def missing_next(self, limit: int) -> tuple[IdArray, int]:
        """Up to ``limit`` ids of chunks that have no next vector yet (ascending), and how many have none."""
        with self._reader() as conn:
            ids = [row[0] for row in conn.execute(f"{_MISSING_NEXT} ORDER BY chunk_id LIMIT ?", (limit,))]
            missing = conn.execute(f"SELECT count(*) FROM ({_MISSING_NEXT})").fetchone()[0]
        return _ids(ids), int(missing)

    def put_next(self, embedder: ModelVersion, ids: IdArray, vectors: npt.ArrayLike) -> IdArray:
        """Store the next vectors of the chunks ``ids``, made by ``embedder``; returns the ids stored (those of
        chunks deleted meanwhile are left out). `EmbedderChangedError` when the re-index targets another version."""
        with self._write_lock, transaction(self._writer) as conn:
            _check_target(conn, embedder)
            matrix = unit_vectors(vectors, int(_meta(conn, "next_dimension")), "vectors")
            rows = conn.execute(
                "SELECT chunk_id FROM chunks WHERE chunk_id IN (SELECT value FROM json_each(?))", (_json_list(ids),)
            ).fetchall()
            kept = {row[0] for row in rows}
            conn.executemany(
                "INSERT OR REPLACE INTO next_vectors(chunk_id, vector) VALUES (?, ?)",
                [(i, row.tobytes()) for i, row in zip(_ids(ids).tolist(), matrix, strict=True) if i in kept],
            )
        return np.sort(_ids(list(kept)))

    def switch(self, embedder: ModelVersion, publish: Publish = unpublished) -> Change | None:
        """Replace every vector by its next vector, the vector width and the pinned version by the re-index's, in
        one transaction that commits within ``publish(change)``; None, changing nothing, while a chunk has no next
        vector (written since: catch up and try again). `EmbedderChangedError` when the re-index targets another
        version."""
        with self._write_lock, transaction(self._writer) as conn:
            _check_target(conn, embedder)
            if conn.execute(f"SELECT EXISTS ({_MISSING_NEXT})").fetchone()[0]:
                return None
            dimension = int(_meta(conn, "next_dimension"))
            conn.execute(
                "UPDATE chunk_content SET vector = "
                "(SELECT vector FROM next_vectors n WHERE n.chunk_id = chunk_content.chunk_id)"
            )
            conn.execute("DELETE FROM next_vectors")
            conn.execute("DELETE FROM meta WHERE key IN ('next_embedder', 'next_dimension')")
            _set_meta(conn, "embedder", embedder.model_dump_json())
            _set_meta(conn, "dimension", dimension)
            revision = self._bump(conn)
            _set_meta(conn, "vectors_revision", revision)
            empty = _ids([])
            change = Change(revision, 0, empty, empty, np.empty((0, dimension), np.float32), [], empty, [])
            self._commit(conn, change, publish, dimension, embedder)
            self._vectors_revision = revision
        return change

    def _checked_vectors(self, prepared: PreparedDocument) -> FloatMatrix:
        field = f"documents[{prepared.document.id}].vectors"
        if not prepared.chunks:
            return self._no_vectors()
        matrix = unit_vectors(prepared.vectors, self.dimension, field)
        if matrix.shape[0] != len(prepared.chunks):
            raise InvalidArgumentError(f"{len(prepared.chunks)} chunks but {matrix.shape[0]} vectors", field=field)
        return matrix

    def _remove_documents(self, conn: sqlite3.Connection, doc_ids: Sequence[str]) -> IdArray:
        """Delete ``doc_ids`` with their chunks and metadata; return the removed chunk ids."""
        ids = json.dumps(list(doc_ids))
        removed = conn.execute(
            "SELECT chunk_id FROM chunks WHERE doc_id IN (SELECT value FROM json_each(?))", (ids,)
        ).fetchall()
        conn.execute("DELETE FROM documents WHERE doc_id IN (SELECT value FROM json_each(?))", (ids,))
        return _ids([row[0] for row in removed])

    @staticmethod
    def _next_chunk_id(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        return 1 + (int(row[0]) if row else 0)

    @staticmethod
    def _bump(conn: sqlite3.Connection) -> int:
        revision: int = conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value"
        ).fetchone()[0]
        return revision

    # --- reads --------------------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = connect(self.path)
            with self._pool_lock:
                self._all_readers.append(conn)
        try:
            yield conn
        finally:
            self._readers.put(conn)

    def get(self, doc_id: str) -> Document:
        """The document ``doc_id``; `NotFoundError` if there is none."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT text, metadata, updated_at, (SELECT count(*) FROM chunks WHERE doc_id = ?) "
                "FROM documents WHERE doc_id = ?",
                (doc_id, doc_id),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"document {doc_id!r} does not exist", field="doc_id")
        text, metadata, updated_at, chunks = row
        return Document(id=doc_id, text=text, metadata=json.loads(metadata), chunks=chunks, updated_at=updated_at)

    def chunks(self, chunk_ids: Sequence[int] | IdArray) -> list[StoredChunk]:
        """The chunks ``chunk_ids`` in that order; ids that are not stored are left out."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT c.chunk_id, c.doc_id, cc.text, cc.start_char, cc.end_char, d.metadata, cc.vector "
                "FROM chunks c JOIN chunk_content cc USING (chunk_id) JOIN documents d USING (doc_id) "
                "WHERE c.chunk_id IN (SELECT value FROM json_each(?))",
                (_json_list(_ids(chunk_ids)),),
            ).fetchall()
        metadata: dict[str, Metadata] = {}
        found = {}
        for chunk_id, doc_id, text, start, end, meta_json, blob in rows:
            meta = metadata.setdefault(doc_id, json.loads(meta_json))
            vector = np.frombuffer(blob, dtype=np.float32)
            found[chunk_id] = StoredChunk(chunk_id, doc_id, text, start, end, meta, vector)
        return [found[chunk_id] for chunk_id in _ids(chunk_ids).tolist() if chunk_id in found]

    def chunk_ids(self, query: DocQuery | None = None) -> IdArray:
        """The ids of all chunks, or of the chunks of the documents ``query`` selects, ascending."""
        sql, params = "SELECT chunk_id FROM chunks ORDER BY chunk_id", tuple[SqlValue, ...]()
        if query is not None:
            sql = f"SELECT chunk_id FROM chunks WHERE doc_id IN ({query.sql}) ORDER BY chunk_id"
            params = query.params
        with self._reader() as conn:
            return np.fromiter((row[0] for row in conn.execute(sql, params)), dtype=np.int64)

    def document_keys(self) -> IdArray:
        """Each document's key (its first chunk's id), ascending; documents without chunks have none."""
        with self._reader() as conn:
            rows = conn.execute("SELECT min(chunk_id) AS key FROM chunks GROUP BY doc_id ORDER BY key")
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def iter_document_texts(self, keys: IdArray) -> Iterator[tuple[IdArray, list[str]]]:
        """``(keys, texts)`` batches of the documents keyed ``keys`` (first chunk ids; other ids are left out),
        ascending, each text as it is indexed (`with_header`)."""
        ordered = np.sort(_ids(keys))
        for start in range(0, len(ordered), _READ_BATCH):
            batch = ordered[start : start + _READ_BATCH]
            with self._reader() as conn:
                rows = conn.execute(
                    "SELECT c.chunk_id, d.header, d.text FROM chunks c JOIN documents d USING (doc_id) "
                    "WHERE c.chunk_id IN (SELECT value FROM json_each(?)) "
                    "AND c.chunk_id = (SELECT min(chunk_id) FROM chunks WHERE doc_id = c.doc_id) ORDER BY c.chunk_id",
                    (_json_list(batch),),
                ).fetchall()
            yield _ids([row[0] for row in rows]), [with_header(header, text) for _, header, text in rows]

    def document_of(self, chunk_ids: Sequence[int] | IdArray) -> dict[int, str]:
        """The document id of each stored chunk of ``chunk_ids``."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT chunk_id, doc_id FROM chunks WHERE chunk_id IN (SELECT value FROM json_each(?))",
                (_json_list(_ids(chunk_ids)),),
            ).fetchall()
        return dict(rows)

    def counts(self) -> tuple[int, int]:
        """``(documents, chunks)``."""
        with self._reader() as conn:
            documents, chunks = conn.execute(
                "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)"
            ).fetchone()
        return documents, chunks

    def chunk_count(self) -> int:
        """The number of chunks (the number of vectors)."""
        return self.counts()[1]

    def sample_vectors(self, n: int, seed: int = 0, *, side: Side = "vector") -> FloatMatrix:
        """Up to ``n`` vectors chosen uniformly at random (fixed ``seed``), e.g. to train an IVF index; the next
        vectors of a re-index when ``side`` is ``next``."""
        ids = self.chunk_ids() if side == "vector" else self.next_ids()
        if len(ids) > n:
            ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
        batches = [vectors for _, vectors in self.iter_vectors(ids, side=side)]
        return np.concatenate(batches) if batches else np.empty((0, self._width(side)), np.float32)

    def iter_vectors(
        self, ids: IdArray | None = None, *, side: Side = "vector"
    ) -> Iterator[tuple[IdArray, FloatMatrix]]:
        """``(ids, vectors)`` batches of the chunks ``ids`` (all chunks when None), ascending by id; their next
        vectors (those a re-index made so far) when ``side`` is ``next``."""
        width = self._width(side)
        for ids_, blobs in self._iter_content(side, ids):
            yield ids_, np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), width)

    def _width(self, side: Side) -> int:
        if side == "vector":
            return self.dimension
        with self._reader() as conn:
            return int(_meta(conn, "next_dimension"))

    def next_ids(self) -> IdArray:
        """The ids of the chunks that have a next vector."""
        with self._reader() as conn:
            return np.fromiter((row[0] for row in conn.execute("SELECT chunk_id FROM next_vectors")), dtype=np.int64)

    def next_vectors(self) -> NextVectors:
        """The next vectors as a `DenseIndex`'s source, to build the re-index's index from."""
        return NextVectors(self)

    def iter_texts(self, ids: IdArray | None = None) -> Iterator[tuple[IdArray, list[str]]]:
        """``(ids, texts)`` batches of the chunks ``ids`` (all chunks when None), ascending by id, each text as it
        is indexed (`with_header`)."""
        yield from self._iter_content("text", ids)

    def _iter_content(self, column: Content, ids: IdArray | None) -> Iterator[tuple[IdArray, list[Any]]]:
        select = _CONTENT_QUERIES[column]
        if ids is None:
            with self._reader() as conn:
                cursor = conn.execute(f"{select} ORDER BY cc.chunk_id")
                while rows := cursor.fetchmany(_READ_BATCH):
                    yield _ids([row[0] for row in rows]), [_content(column, row) for row in rows]
            return
        ordered = np.sort(_ids(ids))
        for start in range(0, len(ordered), _READ_BATCH):
            batch = ordered[start : start + _READ_BATCH]
            with self._reader() as conn:
                rows = conn.execute(
                    f"{select} WHERE cc.chunk_id IN (SELECT value FROM json_each(?)) ORDER BY cc.chunk_id",
                    (_json_list(batch),),
                ).fetchall()
            yield _ids([row[0] for row in rows]), [_content(column, row) for row in rows]

    def _no_vectors(self) -> FloatMatrix:
        return np.empty((0, self.dimension), np.float32)

    def close(self) -> None:
        """Close every connection."""
        with self._write_lock:
            for conn in [*self._all_readers, self._writer]:
                conn.close()
            self._all_readers.clear()


class NextVectors:
    """A re-index's next vectors, as the source a `DenseIndex` rebuilds from."""

    def __init__(self, store: DocumentStore) -> None:
        self._store = store

    def chunk_count(self) -> int:
        """The number of next vectors."""
        return len(self._store.next_ids())

    def sample_vectors(self, n: int, seed: int = 0) -> FloatMatrix:
        """Up to ``n`` next vectors chosen at random."""
        return self._store.sample_vectors(n, seed, side="next")

    def iter_vectors(self, ids: IdArray | None = None) -> Iterator[tuple[IdArray, FloatMatrix]]:
        """``(ids, next vectors)`` batches, ascending by id."""
        return self._store.iter_vectors(ids, side="next")


def _meta(conn: sqlite3.Connection, key: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _set_meta(conn: sqlite3.Connection, key: str, value: SqlValue) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


def _check_target(conn: sqlite3.Connection, embedder: ModelVersion) -> None:
    """`EmbedderChangedError` unless the re-index's next vectors are for ``embedder``."""
    if _version(conn, "next_embedder") != embedder:
        raise EmbedderChangedError(f"the next vectors are not for {embedder.name} {embedder.version}")


def _version(conn: sqlite3.Connection, key: str) -> ModelVersion | None:
    """The model version stored as JSON under ``key`` in ``meta``."""
    value = _meta(conn, key)
    return None if value is None else ModelVersion.model_validate_json(value)

"""`DocumentStore`: one collection's store, the source of truth.

Documents, their metadata, their chunks (text, offsets, float32 vector), a revision counter that every
committed write bumps, and the revision log: what each revision added and removed, in commit order, for
derived indexes to follow. The FAISS and lexical indexes are derived from it. A write is one transaction;
its commit is the acknowledgement point, and the caller may wrap it (``publish``) to move its derived
indexes with it. The tables live in an SQLite file or in a PostgreSQL schema (`Database`); both run the
same statements.

The store is pinned to the embedder version that made its vectors (``meta.embedder``). A re-index
to another version fills ``next_vectors`` side by side with the live vectors (``begin_next``,
``put_next``), while writes go on with the pinned version; `switch` then replaces the vectors, their
width and the pinned version in one transaction, once every chunk has its next vector. Until that
commit the live vectors are untouched, so a crash at any point leaves the store serving the old
version, or (after it) the new one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    Table,
    Text,
    delete,
    exists,
    func,
    insert,
    inspect,
    select,
    update,
)

from tritonrag.clients.wire.schema import Document, DocumentIn, Metadata, ModelVersion
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.database import Database, Scalar, add_missing_column, json_column

FloatMatrix = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
SqlValue = str | int | float
DocQuery = Select[tuple[str]]  # selects document ids (a compiled filter)

# Chunk ids are never reused (AUTOINCREMENT; an identity sequence on PostgreSQL), so a chunk id names one
# immutable text and vector forever: a derived index is brought up to date by the difference of its id
# set and the store's, or by the revision log.
_TABLES = MetaData()
_ChunkId = BigInteger().with_variant(Integer, "sqlite")  # SQLite's AUTOINCREMENT needs INTEGER
_meta = Table("meta", _TABLES, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
_documents = Table(
    "documents",
    _TABLES,
    Column("doc_id", Text, primary_key=True),
    Column("text", Text, nullable=False),
    Column("metadata", json_column(), nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("header", Text, nullable=False, server_default=""),
)
_chunks = Table(
    "chunks",
    _TABLES,
    Column("chunk_id", _ChunkId, primary_key=True, autoincrement=True),
    Column("doc_id", Text, ForeignKey("documents.doc_id", ondelete="CASCADE"), nullable=False),
    Index("chunks_by_doc", "doc_id", "chunk_id"),
    sqlite_autoincrement=True,
)
_chunk_content = Table(
    "chunk_content",
    _TABLES,
    Column("chunk_id", _ChunkId, ForeignKey("chunks.chunk_id", ondelete="CASCADE"), primary_key=True),
    Column("start_char", Integer, nullable=False),
    Column("end_char", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("vector", LargeBinary, nullable=False),
)
_doc_metadata = Table(
    "doc_metadata",
    _TABLES,
    Column("doc_id", Text, ForeignKey("documents.doc_id", ondelete="CASCADE"), nullable=False),
    Column("key", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("value", Scalar, nullable=False),
    Index("doc_metadata_lookup", "key", "kind", "value", "doc_id"),
    Index("doc_metadata_by_doc", "doc_id"),
)
_next_vectors = Table(
    "next_vectors",
    _TABLES,
    Column("chunk_id", _ChunkId, ForeignKey("chunks.chunk_id", ondelete="CASCADE"), primary_key=True),
    Column("vector", LargeBinary, nullable=False),
)
_revisions = Table(
    "revisions",
    _TABLES,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", Text, nullable=False),
    Column("committed_at", Float, nullable=False),
    Column("documents", Integer, nullable=False),
    Column("added", json_column(), nullable=False),
    Column("removed", json_column(), nullable=False),
)
REVISIONS_CHANNEL = "tritonrag_revisions"  # PostgreSQL's NOTIFY channel of committed writes
DOC_METADATA = _doc_metadata  # what filters select from (server/retrieval/filters.py)
_INT64_MAX = 2**63 - 1
_READ_BATCH = 8192
Side = Literal["vector", "next"]  # the live vectors, or a re-index's next vectors
Content = Literal["vector", "next", "text"]
ChangeKind = Literal["upsert", "delete", "switch"]


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
class LoggedRevision:
    """One entry of the revision log: what the write that made ``revision`` did. A ``switch`` replaced every
    vector (a follower rebuilds its dense index)."""

    revision: int
    kind: ChangeKind
    committed_at: float
    documents: int
    added: IdArray
    removed: IdArray


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


def _metadata_rows(doc_id: str, metadata: Metadata) -> Iterator[dict[str, Any]]:
    """One row per scalar; a list-valued field gives one row per element."""
    for key, value in metadata.items():
        for element in value if isinstance(value, list) else [value]:
            kind, encoded = encode_scalar(element)
            yield {"doc_id": doc_id, "key": key, "kind": kind, "value": encoded}


def _content(column: Content, row: Sequence[Any]) -> Any:
    """A content query's vector blob, or its text as indexed."""
    return with_header(row[2], row[1]) if column == "text" else row[1]


def _ids(values: Sequence[int] | IdArray) -> IdArray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _batches(values: Sequence[Any] | IdArray) -> Iterator[list[Any]]:
    """``values`` in lists of at most `_READ_BATCH`: an ``IN`` list stays within every backend's parameter limit."""
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    for start in range(0, len(items), _READ_BATCH):
        yield items[start : start + _READ_BATCH]


def stored_dimension(database: Database) -> int | None:
    """The vector width the store in ``database`` was created for; None when there is no store yet (nothing is
    created)."""
    if not database.exists("meta"):
        return None
    with database.read() as conn:
        value = _get_meta(conn, "dimension")
    return None if value is None else int(value)


# The statements of the reads, built once (building one costs more than running it on a few rows).
_CONTENT: dict[Content, Select[Any]] = {  # (chunk_id, vector) of the live or next vectors, or (chunk_id, text, header)
    "vector": select(_chunk_content.c.chunk_id, _chunk_content.c.vector).order_by(_chunk_content.c.chunk_id),
    "next": select(_next_vectors.c.chunk_id, _next_vectors.c.vector).order_by(_next_vectors.c.chunk_id),
    "text": select(_chunk_content.c.chunk_id, _chunk_content.c.text, _documents.c.header)
    .select_from(_chunk_content.join(_chunks).join(_documents))
    .order_by(_chunk_content.c.chunk_id),
}
_STORED_CHUNKS = select(
    _chunks.c.chunk_id,
    _chunks.c.doc_id,
    _chunk_content.c.text,
    _chunk_content.c.start_char,
    _chunk_content.c.end_char,
    _documents.c.metadata,
    _chunk_content.c.vector,
).select_from(_chunks.join(_chunk_content).join(_documents))
_other = _chunks.alias("other")
_DOCUMENT_TEXTS = (  # each document's first chunk id, header and text
    select(_chunks.c.chunk_id, _documents.c.header, _documents.c.text)
    .select_from(_chunks.join(_documents))
    .where(
        _chunks.c.chunk_id
        == select(func.min(_other.c.chunk_id)).where(_other.c.doc_id == _chunks.c.doc_id).scalar_subquery()
    )
    .order_by(_chunks.c.chunk_id)
)
_MISSING_NEXT = select(_chunks.c.chunk_id).where(~exists().where(_next_vectors.c.chunk_id == _chunks.c.chunk_id))


def _content_id(column: Content) -> Any:
    return _next_vectors.c.chunk_id if column == "next" else _chunk_content.c.chunk_id


class DocumentStore:
    """One collection's documents, chunks, metadata and vectors, in SQLite or PostgreSQL (`Database`).

    Thread-safe: this process's writes are serialised on a lock, reads use the engine's pool of connections.
    Several processes may write the same PostgreSQL store: each write transaction first locks the revision row,
    so writes commit one at a time, in the order of their revisions. Consistency across several calls is the
    caller's (see `Collection`).
    """

    def __init__(self, database: Database, dimension: int) -> None:
        """Open or create the store in ``database`` for vectors ``dimension`` wide."""
        self.database = database
        self.dimension = dimension
        self._write_lock = threading.Lock()
        with database.write() as conn:
            if database.dialect == "sqlite":
                _upgrade_sqlite(conn)
            database.create_tables(conn, _TABLES)
            for key, value in (("revision", 0), ("dimension", dimension)):
                if _get_meta(conn, key) is None:
                    _set_meta(conn, key, value)
            stored = self._read_state(conn)
        if stored != dimension:
            self.close()
            raise InvalidArgumentError(f"{self.where} holds {stored}-d vectors, not {dimension}-d", field="dimension")

    @property
    def where(self) -> str:
        """The SQLite file or PostgreSQL schema, for messages."""
        return str(self.database.path or f"schema {self.database.schema}")

    @property
    def revision(self) -> int:
        """The number of committed writes so far (as of this process's last write or `refresh`)."""
        return self._revision

    @property
    def vectors_revision(self) -> int:
        """The revision of the last `switch` (0 if none): a chunk id names one vector since then only."""
        return self._vectors_revision

    @property
    def embedder(self) -> ModelVersion | None:
        """The embedder version that made the vectors; None until the store is pinned."""
        return self._embedder

    def refresh(self) -> int:
        """Read the revision, the pinned version and the width as committed (by any process); returns the
        revision."""
        with self.database.read() as conn:
            self.dimension = self._read_state(conn)
        return self._revision

    def _read_state(self, conn: Connection) -> int:
        """Read the revision, the pinned version and the revision of the last switch; returns the stored width."""
        self._revision = int(_get_meta(conn, "revision"))
        self._embedder = _version(conn, "embedder")
        self._vectors_revision = int(_get_meta(conn, "vectors_revision") or 0)
        return int(_get_meta(conn, "dimension"))

    def pin(self, embedder: ModelVersion) -> ModelVersion:
        """Pin an unpinned store to ``embedder``; returns the version it is pinned to (an earlier pin stays)."""
        with self._write_lock, self.database.write() as conn:
            _lock_revision(conn)
            pinned = _version(conn, "embedder") or embedder
            _set_meta(conn, "embedder", pinned.model_dump_json())
        self._embedder = pinned
        return pinned

    @staticmethod
    def _pinned(conn: Connection, embedder: ModelVersion | None) -> ModelVersion | None:
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
        with self._write_lock, self.database.write() as conn:
            revision = _lock_revision(conn) + 1
            self.dimension = int(_get_meta(conn, "dimension"))  # the width a switch (here or elsewhere) may change
            pinned = self._pinned(conn, embedder)
            vectors = [self._checked_vectors(prepared) for prepared in documents]
            removed = self._remove_documents(conn, doc_ids)
            if documents:
                conn.execute(
                    insert(_documents),
                    [
                        {
                            "doc_id": p.document.id,
                            "text": p.document.text,
                            "metadata": p.document.metadata,
                            "updated_at": now,
                            "header": p.header,
                        }
                        for p in documents
                    ],
                )
            metadata_rows = [row for p in documents for row in _metadata_rows(p.document.id, p.document.metadata)]
            if metadata_rows:
                conn.execute(insert(_doc_metadata), metadata_rows)
            owners = [{"doc_id": p.document.id} for p in documents for _ in p.chunks]
            added = _ids([])
            if owners:
                inserted = conn.execute(
                    insert(_chunks).returning(_chunks.c.chunk_id, sort_by_parameter_order=True), owners
                )
                added = _ids(inserted.scalars().all())
            spans = [chunk for p in documents for chunk in p.chunks]
            matrix = np.concatenate(vectors) if vectors else self._no_vectors()
            if spans:
                conn.execute(
                    insert(_chunk_content),
                    [
                        {"chunk_id": i, "start_char": span.start, "end_char": span.end, "text": span.text}
                        | {"vector": row.tobytes()}
                        for i, span, row in zip(added.tolist(), spans, matrix, strict=True)
                    ],
                )
            counts = np.asarray([len(p.chunks) for p in documents], np.int64)
            keys = added[np.cumsum(counts)[counts > 0] - counts[counts > 0]] if len(added) else _ids([])
            document_texts = [with_header(p.header, p.document.text) for p in documents if p.chunks]
            change = Change(revision, len(documents), removed, added, matrix, texts, keys, document_texts)
            _log(conn, change, "upsert", self.database.schema)
            self._commit(conn, change, publish, embedder=pinned)
        return change

    def delete(self, doc_ids: Sequence[str], publish: Publish = unpublished) -> Change:
        """Delete the documents ``doc_ids`` (absent ids are ignored) in one transaction, which commits within
        ``publish(change)``."""
        with self._write_lock, self.database.write() as conn:
            revision = _lock_revision(conn)
            found = [
                doc_id
                for batch in _batches(list(dict.fromkeys(doc_ids)))
                for doc_id in conn.execute(select(_documents.c.doc_id).where(_documents.c.doc_id.in_(batch))).scalars()
            ]
            return self._delete_found(conn, revision, found, publish)

    def delete_where(self, query: DocQuery, publish: Publish = unpublished) -> Change:
        """Delete the documents that ``query`` selects, in one transaction, which commits within
        ``publish(change)``."""
        with self._write_lock, self.database.write() as conn:
            revision = _lock_revision(conn)
            found = list(conn.execute(query).scalars().all())
            return self._delete_found(conn, revision, found, publish)

    def _delete_found(self, conn: Connection, revision: int, doc_ids: list[str], publish: Publish) -> Change:
        """Delete ``doc_ids`` (found in this transaction) as revision ``revision + 1``; when there are none, change
        nothing and publish nothing."""
        empty = _ids([])
        if not doc_ids:
            return Change(revision, 0, empty, empty, self._no_vectors(), [], empty, [])
        removed = self._remove_documents(conn, doc_ids)
        change = Change(revision + 1, len(doc_ids), removed, empty, self._no_vectors(), [], empty, [])
        _log(conn, change, "delete", self.database.schema)
        self._commit(conn, change, publish)
        return change

    def _commit(
        self,
        conn: Connection,
        change: Change,
        publish: Publish,
        dimension: int | None = None,
        embedder: ModelVersion | None = None,
    ) -> None:
        """Commit within ``publish(change)``, which sees the new revision, width and pinned version."""
        with publish(change):
            conn.commit()
            self._revision = change.revision
            self.dimension = dimension or self.dimension
            self._embedder = embedder or self._embedder

    # --- re-index: next vectors side by side ----------------------------------------------------

    def begin_next(self, embedder: ModelVersion, dimension: int) -> None:
        """Make ``embedder`` (``dimension`` wide) the target of the next vectors, keeping those already made for
        it (a resumed re-index) and dropping any made for another target."""
        with self._write_lock, self.database.write() as conn:
            _lock_revision(conn)
            next_dimension = _get_meta(conn, "next_dimension")
            if (
                _version(conn, "next_embedder") != embedder
                or next_dimension is None
                or int(next_dimension) != dimension
            ):
                conn.execute(delete(_next_vectors))
                _set_meta(conn, "next_embedder", embedder.model_dump_json())
                _set_meta(conn, "next_dimension", dimension)

    def missing_next(self, limit: int) -> tuple[IdArray, int]:
        """Up to ``limit`` ids of chunks that have no next vector yet (ascending), and how many have none."""
        with self.database.read() as conn:
            ids = conn.execute(_MISSING_NEXT.order_by(_chunks.c.chunk_id).limit(limit)).scalars().all()
            missing = conn.execute(select(func.count()).select_from(_MISSING_NEXT.subquery())).scalar_one()
        return _ids(ids), int(missing)

    def put_next(self, embedder: ModelVersion, ids: IdArray, vectors: npt.ArrayLike) -> IdArray:
        """Store the next vectors of the chunks ``ids``, made by ``embedder``; returns the ids stored (those of
        chunks deleted meanwhile are left out). `EmbedderChangedError` when the re-index targets another version."""
        with self._write_lock, self.database.write() as conn:
            _lock_revision(conn)
            _check_target(conn, embedder)
            matrix = unit_vectors(vectors, int(_get_meta(conn, "next_dimension")), "vectors")
            kept = {
                chunk_id
                for batch in _batches(_ids(ids))
                for chunk_id in conn.execute(select(_chunks.c.chunk_id).where(_chunks.c.chunk_id.in_(batch))).scalars()
            }
            rows = [(i, row.tobytes()) for i, row in zip(_ids(ids).tolist(), matrix, strict=True) if i in kept]
            if rows:
                conn.execute(delete(_next_vectors).where(_next_vectors.c.chunk_id.in_([i for i, _ in rows])))
                conn.execute(insert(_next_vectors), [{"chunk_id": i, "vector": blob} for i, blob in rows])
        return np.sort(_ids(list(kept)))

    def switch(self, embedder: ModelVersion, publish: Publish = unpublished) -> Change | None:
        """Replace every vector by its next vector, the vector width and the pinned version by the re-index's, in
        one transaction that commits within ``publish(change)``; None, changing nothing, while a chunk has no next
        vector (written since: catch up and try again). `EmbedderChangedError` when the re-index targets another
        version."""
        with self._write_lock, self.database.write() as conn:
            revision = _lock_revision(conn) + 1
            _check_target(conn, embedder)
            if conn.execute(select(exists(_MISSING_NEXT))).scalar_one():
                return None
            dimension = int(_get_meta(conn, "next_dimension"))
            next_vector = select(_next_vectors.c.vector).where(_next_vectors.c.chunk_id == _chunk_content.c.chunk_id)
            conn.execute(update(_chunk_content).values(vector=next_vector.scalar_subquery()))
            conn.execute(delete(_next_vectors))
            conn.execute(delete(_meta).where(_meta.c.key.in_(["next_embedder", "next_dimension"])))
            _set_meta(conn, "embedder", embedder.model_dump_json())
            _set_meta(conn, "dimension", dimension)
            _set_meta(conn, "vectors_revision", revision)
            empty = _ids([])
            change = Change(revision, 0, empty, empty, np.empty((0, dimension), np.float32), [], empty, [])
            _log(conn, change, "switch", self.database.schema)
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

    @staticmethod
    def _remove_documents(conn: Connection, doc_ids: Sequence[str]) -> IdArray:
        """Delete ``doc_ids`` with their chunks and metadata; return the removed chunk ids."""
        removed: list[int] = []
        for batch in _batches(doc_ids):
            removed += conn.execute(select(_chunks.c.chunk_id).where(_chunks.c.doc_id.in_(batch))).scalars().all()
            conn.execute(delete(_documents).where(_documents.c.doc_id.in_(batch)))
        return np.sort(_ids(removed))

    # --- the revision log ---------------------------------------------------------------------

    def changes_since(self, revision: int, limit: int = 1000) -> list[LoggedRevision]:
        """The log's entries after ``revision``, ascending, at most ``limit``. An entry's added chunks may have been
        removed by a later one: apply them in order."""
        query = select(_revisions).where(_revisions.c.revision > revision).order_by(_revisions.c.revision)
        with self.database.read() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [
            LoggedRevision(row.revision, row.kind, row.committed_at, row.documents, _ids(row.added), _ids(row.removed))
            for row in rows
        ]

    # --- reads --------------------------------------------------------------------------------

    def get(self, doc_id: str) -> Document:
        """The document ``doc_id``; `NotFoundError` if there is none."""
        chunk_count = select(func.count()).where(_chunks.c.doc_id == doc_id).scalar_subquery()
        query = select(_documents.c.text, _documents.c.metadata, _documents.c.updated_at, chunk_count).where(
            _documents.c.doc_id == doc_id
        )
        with self.database.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"document {doc_id!r} does not exist", field="doc_id")
        text, metadata, updated_at, chunks = row
        return Document(id=doc_id, text=text, metadata=metadata, chunks=chunks, updated_at=updated_at)

    def chunks(self, chunk_ids: Sequence[int] | IdArray) -> list[StoredChunk]:
        """The chunks ``chunk_ids`` in that order; ids that are not stored are left out."""
        found = {}
        with self.database.read() as conn:
            for batch in _batches(_ids(chunk_ids)):
                for chunk_id, doc_id, text, start, end, metadata, blob in conn.execute(
                    _STORED_CHUNKS.where(_chunks.c.chunk_id.in_(batch))
                ):
                    vector = np.frombuffer(blob, dtype=np.float32)
                    found[chunk_id] = StoredChunk(chunk_id, doc_id, text, start, end, metadata, vector)
        return [found[chunk_id] for chunk_id in _ids(chunk_ids).tolist() if chunk_id in found]

    def chunk_ids(self, query: DocQuery | None = None) -> IdArray:
        """The ids of all chunks, or of the chunks of the documents ``query`` selects, ascending."""
        statement = select(_chunks.c.chunk_id).order_by(_chunks.c.chunk_id)
        if query is not None:
            statement = statement.where(_chunks.c.doc_id.in_(query))
        with self.database.read() as conn:
            return _ids(conn.execute(statement).scalars().all())

    def document_keys(self) -> IdArray:
        """Each document's key (its first chunk's id), ascending; documents without chunks have none."""
        key = func.min(_chunks.c.chunk_id)
        with self.database.read() as conn:
            return _ids(conn.execute(select(key).group_by(_chunks.c.doc_id).order_by(key)).scalars().all())

    def iter_document_texts(self, keys: IdArray) -> Iterator[tuple[IdArray, list[str]]]:
        """``(keys, texts)`` batches of the documents keyed ``keys`` (first chunk ids; other ids are left out),
        ascending, each text as it is indexed (`with_header`)."""
        for batch in _batches(np.sort(_ids(keys))):
            with self.database.read() as conn:
                rows = conn.execute(_DOCUMENT_TEXTS.where(_chunks.c.chunk_id.in_(batch))).all()
            yield _ids([row[0] for row in rows]), [with_header(header, text) for _, header, text in rows]

    def document_of(self, chunk_ids: Sequence[int] | IdArray) -> dict[int, str]:
        """The document id of each stored chunk of ``chunk_ids``."""
        query = select(_chunks.c.chunk_id, _chunks.c.doc_id)
        with self.database.read() as conn:
            return {
                chunk_id: doc_id
                for batch in _batches(_ids(chunk_ids))
                for chunk_id, doc_id in conn.execute(query.where(_chunks.c.chunk_id.in_(batch)))
            }

    def counts(self) -> tuple[int, int]:
        """``(documents, chunks)``."""
        documents = select(func.count()).select_from(_documents).scalar_subquery()
        chunks = select(func.count()).select_from(_chunks).scalar_subquery()
        with self.database.read() as conn:
            row = conn.execute(select(documents, chunks)).one()
        return int(row[0]), int(row[1])

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
        with self.database.read() as conn:
            return int(_get_meta(conn, "next_dimension"))

    def next_ids(self) -> IdArray:
        """The ids of the chunks that have a next vector."""
        with self.database.read() as conn:
            return _ids(conn.execute(select(_next_vectors.c.chunk_id)).scalars().all())

    def next_vectors(self) -> NextVectors:
        """The next vectors as a `DenseIndex`'s source, to build the re-index's index from."""
        return NextVectors(self)

    def iter_texts(self, ids: IdArray | None = None) -> Iterator[tuple[IdArray, list[str]]]:
        """``(ids, texts)`` batches of the chunks ``ids`` (all chunks when None), ascending by id, each text as it
        is indexed (`with_header`)."""
        yield from self._iter_content("text", ids)

    def _iter_content(self, column: Content, ids: IdArray | None) -> Iterator[tuple[IdArray, list[Any]]]:
        query = _CONTENT[column]
        if ids is None:  # streamed: a server-side cursor on PostgreSQL, never every row at once
            with self.database.read() as conn:
                result = conn.execute(query.execution_options(yield_per=_READ_BATCH))
                for rows in result.partitions():
                    yield _ids([row[0] for row in rows]), [_content(column, row) for row in rows]
            return
        for batch in _batches(np.sort(_ids(ids))):
            with self.database.read() as conn:
                rows = conn.execute(query.where(_content_id(column).in_(batch))).all()
            yield _ids([row[0] for row in rows]), [_content(column, row) for row in rows]

    def _no_vectors(self) -> FloatMatrix:
        return np.empty((0, self.dimension), np.float32)

    def drop(self) -> None:
        """Close the store and drop its tables (a PostgreSQL schema; an SQLite file is deleted by its owner)."""
        self.close()
        self.database.drop()

    def close(self) -> None:
        """Close every connection."""
        with self._write_lock:
            self.database.close()


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


def _lock_revision(conn: Connection) -> int:
    """Begin a write: lock the revision row (on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locked the file) and
    return the revision. Every write takes this lock first, so writers never deadlock and commit in the order
    of their revisions."""
    query = select(_meta.c.value).where(_meta.c.key == "revision").with_for_update()
    return int(conn.execute(query).scalar_one())


def _log(conn: Connection, change: Change, kind: ChangeKind, schema: str | None) -> None:
    """Bump the revision to ``change.revision`` and append what it did to the revision log; in a shared database
    (a ``schema``), notify the followers on `REVISIONS_CHANNEL` (delivered at the commit)."""
    _set_meta(conn, "revision", change.revision)
    if schema is not None:
        conn.execute(select(func.pg_notify(REVISIONS_CHANNEL, schema)))
    conn.execute(
        insert(_revisions).values(
            revision=change.revision,
            kind=kind,
            committed_at=time.time(),
            documents=change.documents,
            added=change.added.tolist(),
            removed=change.removed.tolist(),
        )
    )


def _get_meta(conn: Connection, key: str) -> Any:
    return conn.execute(select(_meta.c.value).where(_meta.c.key == key)).scalar_one_or_none()


def _set_meta(conn: Connection, key: str, value: SqlValue) -> None:
    if conn.execute(update(_meta).where(_meta.c.key == key).values(value=str(value))).rowcount == 0:
        conn.execute(insert(_meta).values(key=key, value=str(value)))


def _check_target(conn: Connection, embedder: ModelVersion) -> None:
    """`EmbedderChangedError` unless the re-index's next vectors are for ``embedder``."""
    if _version(conn, "next_embedder") != embedder:
        raise EmbedderChangedError(f"the next vectors are not for {embedder.name} {embedder.version}")


def _version(conn: Connection, key: str) -> ModelVersion | None:
    """The model version stored as JSON under ``key`` in ``meta``."""
    value = _get_meta(conn, key)
    return None if value is None else ModelVersion.model_validate_json(value)


def _upgrade_sqlite(conn: Connection) -> None:
    """Bring an SQLite store written by an earlier version to today's tables (new tables are created after)."""
    if not inspect(conn).has_table("meta"):
        return
    conn.execute(update(_meta).where(_meta.c.key == "generation").values(key="revision"))  # the name before 0.2
    add_missing_column(conn, "documents", "header", "TEXT NOT NULL DEFAULT ''")  # before 0.3

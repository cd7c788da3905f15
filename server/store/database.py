"""Where the stores keep their tables: SQLite files (embedded, the default) or one PostgreSQL database.

Both backends run the same SQLAlchemy Core statements. On SQLite each store is a file of its own (WAL,
``synchronous=FULL``; a write transaction is ``BEGIN IMMEDIATE``, so writers queue for the file's lock).
On PostgreSQL every store shares one database and connection pool, each in a schema of its own
(``schema_translate_map``), so that the same tables serve each collection; a store serialises its writers
on a row lock it takes first (see `DocumentStore`). Either way a write is acknowledged after its
transaction commits, and a commit survives a crash.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, make_url, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.schema import CreateSchema, DropSchema
from sqlalchemy.types import JSON, TypeDecorator, TypeEngine, UserDefinedType

from tritonrag.server.store.sqlite import BUSY_TIMEOUT_MS, configure

_WRITE = "tritonrag_write"  # execution option: this connection's transaction writes
_SQLITE_POOL_SIZE = 8


class Database:
    """An engine and the schema (PostgreSQL; None on SQLite) one store's tables live in."""

    def __init__(self, engine: Engine, schema: str | None = None, path: Path | None = None) -> None:
        self.engine = engine
        self.schema = schema
        self.path = path  # the SQLite file

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: commits when the block ends (or when the block calls ``commit()`` itself, at the
        moment it chooses); rolls back when it raises."""
        with self.engine.connect() as conn:
            conn.execution_options(schema_translate_map={None: self.schema}, **{_WRITE: True})
            conn.begin()
            yield conn
            if conn.in_transaction():
                conn.commit()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads; what it reads is one snapshot per statement."""
        with self.engine.connect() as conn:
            conn.execution_options(schema_translate_map={None: self.schema})
            yield conn

    def create_tables(self, conn: Connection, metadata: MetaData) -> None:
        """In the write transaction ``conn``: create the schema (PostgreSQL) and whichever of ``metadata``'s
        tables and indexes are missing. Two processes creating the same store at once take turns."""
        if self.schema is not None:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:schema))"), {"schema": self.schema})
            conn.execute(CreateSchema(self.schema, if_not_exists=True))
        metadata.create_all(conn)

    def exists(self, table: str) -> bool:
        """Whether the store has the table ``table`` (its schema and table were created); creates nothing."""
        if self.path is not None and not self.path.is_file():
            return False
        with self.read() as conn:
            return self.engine.dialect.has_table(conn, table, schema=self.schema)

    def drop(self) -> None:
        """Drop the schema and everything in it (PostgreSQL); on SQLite the caller deletes the file."""
        if self.schema is not None:
            with self.write() as conn:
                conn.execute(DropSchema(self.schema, cascade=True, if_exists=True))

    def close(self) -> None:
        """Close this store's connections: the engine's, on SQLite (on PostgreSQL the engine is shared)."""
        if self.schema is None:
            self.engine.dispose()


class StoreLocation:
    """Where a data directory's stores live: files under it, or the PostgreSQL database at ``url``.

    Hands out one `Database` per store; PostgreSQL's engine (and its pool) is shared by all of them.
    """

    def __init__(self, url: str = "") -> None:
        """``url``: empty for SQLite files; else an SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db``
        (``postgresql://`` means the same)."""
        self.url = url  # checked by `StoreSettings`
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether the stores are in a shared database (PostgreSQL), which other processes may write too."""
        return bool(self.url)

    def database(self, file: Path, name: str) -> Database:
        """The store ``name``: the SQLite file ``file``, or its schema in the shared database."""
        if not self.url:
            return sqlite_database(file)
        return Database(self._shared_engine(), schema_name(name))

    def _shared_engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = postgresql_engine(self.url)
            return self._engine

    def close(self) -> None:
        """Close the shared database's connections."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


def schema_name(name: str) -> str:
    """The PostgreSQL schema of the store ``name`` (any text: a collection key holds ``/``): a digest, so
    that every name maps to a valid identifier and no two collide."""
    return "s_" + hashlib.sha256(name.encode()).hexdigest()[:32]


def sqlite_database(path: Path) -> Database:
    """The SQLite file at ``path`` (created if missing), in WAL mode with ``synchronous=FULL``."""
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        pool_size=_SQLITE_POOL_SIZE,
        max_overflow=-1,
    )
    event.listen(engine, "connect", _sqlite_connected)
    event.listen(engine, "begin", _sqlite_begin)
    return Database(engine, path=path)


def _sqlite_connected(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # The sqlite3 module's own transaction handling is off: SQLAlchemy's "begin" event issues BEGIN.
    configure(dbapi_connection)


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the file's write lock at BEGIN, not at its first write: two writers never deadlock
    # upgrading their read locks, and the busy timeout queues the second. Reads run in autocommit, one
    # snapshot per statement (as on PostgreSQL), without BEGIN and ROLLBACK around each.
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def add_missing_column(conn: Connection, table: str, column: str, definition: str) -> None:
    """An SQLite upgrade of a file written by an earlier version: add ``column`` (``definition``: its type and
    constraints) to ``table`` when the table exists without it."""
    inspector = inspect(conn)
    if inspector.has_table(table) and column not in {c["name"] for c in inspector.get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def postgresql_engine(url: str) -> Engine:
    """An engine for the PostgreSQL database at ``url`` (``postgresql://`` uses psycopg 3)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)


class _NoAffinity(UserDefinedType[Any]):
    """An SQLite column that keeps each value's own type (declared ``BLOB``: no type affinity)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "BLOB"


class Scalar(TypeDecorator[Any]):
    """A column of strings, numbers or 0/1 that compares as its values do: untyped on SQLite, JSONB on PostgreSQL
    (where numbers compare as numbers and never equal strings)."""

    impl = _NoAffinity
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else _NoAffinity())


def json_column() -> TypeEngine[Any]:
    """JSON: text on SQLite, JSONB on PostgreSQL."""
    return JSON().with_variant(JSONB(), "postgresql")

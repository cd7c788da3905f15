"""SQLite connections as the stores use them: WAL, durable commits, explicit transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``synchronous=FULL``: a returned commit survives a crash or power loss.

    The connection is in autocommit mode (``isolation_level=None``); group writes with `transaction`.
    It may be used from any thread, one thread at a time.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    configure(conn)
    return conn


def configure(conn: sqlite3.Connection) -> None:
    """WAL, ``synchronous=FULL``, foreign keys, the busy timeout; autocommit (``isolation_level=None``)."""
    conn.isolation_level = None
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", f"busy_timeout={BUSY_TIMEOUT_MS}"):
        conn.execute(f"PRAGMA {pragma}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` when the block raises. The block may ``COMMIT``
    itself, at the moment it chooses."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if conn.in_transaction:
        conn.execute("COMMIT")

"""``RolloutState``: ``<data_dir>/models.sqlite``: every model version the orchestrator knows, and its history.

Per (model, version): the state (``VersionState``), the canary's share and step, the reason of the
last change, and whether the controller last had it loaded; an append-only event log says what
happened when. A restarted orchestrator restores the routes from it, and the launcher loads the same
versions before Triton serves anything, so a version dropped into the repository is never loaded
before it is validated.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tritonrag.clients.wire.models import ModelEvent, VersionState
from tritonrag.server.store.sqlite import connect, transaction

STATE_FILE = "models.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    share REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    loaded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_model ON events(model, id);
"""


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One version's row."""

    model: str
    version: str
    state: VersionState
    share: float
    step: int
    reason: str
    updated_at: float


class RolloutState:
    """The versions table and the event log; every change is one transaction with its event."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / STATE_FILE
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as conn:
            yield conn

    def record(
        self,
        model: str,
        version: str,
        state: VersionState,
        event: str,
        detail: str = "",
        *,
        share: float = 0.0,
        step: int = 0,
    ) -> None:
        """Put ``version`` of ``model`` in ``state`` and log ``event`` (``detail`` is also the version's reason)."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO versions(model, version, state, share, step, reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model, version) DO UPDATE SET state = excluded.state, "
                "share = excluded.share, step = excluded.step, reason = excluded.reason, "
                "updated_at = excluded.updated_at",
                (model, version, state.value, share, step, detail, now),
            )
            conn.execute(
                "INSERT INTO events(model, version, at, event, detail) VALUES (?, ?, ?, ?, ?)",
                (model, version, now, event, detail),
            )

    def versions(self, model: str) -> list[VersionRecord]:
        """Every known version of ``model``, ascending."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT model, version, state, share, step, reason, updated_at FROM versions WHERE model = ?", (model,)
            ).fetchall()
        records = [VersionRecord(r[0], r[1], VersionState(r[2]), r[3], r[4], r[5], r[6]) for r in rows]
        return sorted(records, key=lambda r: int(r.version))

    def get(self, model: str, version: str) -> VersionRecord | None:
        """One version's row, if known."""
        return next((r for r in self.versions(model) if r.version == version), None)

    def in_state(self, model: str, *states: VersionState) -> list[VersionRecord]:
        """The versions of ``model`` in any of ``states``, ascending."""
        return [r for r in self.versions(model) if r.state in states]

    def set_loaded(self, model: str, versions: set[str]) -> None:
        """Record that exactly ``versions`` of ``model`` are loaded."""
        with self._write() as conn:
            conn.execute(
                "UPDATE versions SET loaded = (version IN (SELECT value FROM json_each(?))) WHERE model = ?",
                (json.dumps(sorted(versions)), model),
            )

    def loaded(self, model: str) -> list[str]:
        """The versions of ``model`` last recorded as loaded, ascending."""
        with self._lock:
            rows = self._conn.execute("SELECT version FROM versions WHERE model = ? AND loaded", (model,)).fetchall()
        return sorted((r[0] for r in rows), key=int)

    def events(self, model: str, limit: int = 50) -> list[ModelEvent]:
        """``model``'s latest events, newest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, version, event, detail FROM events WHERE model = ? ORDER BY id DESC LIMIT ?",
                (model, limit),
            ).fetchall()
        return [ModelEvent(at=r[0], version=r[1], event=r[2], detail=r[3]) for r in rows]


def loaded_versions(data_dir: Path, model: str) -> list[str] | None:
    """The versions of ``model`` that Triton should load at start, from the state in ``data_dir``; None when the
    orchestrator has no state for it yet (then the newest version is loaded and adopted as stable)."""
    if not (data_dir / STATE_FILE).is_file():
        return None
    state = RolloutState(data_dir)
    try:
        return state.loaded(model) or None
    finally:
        state.close()

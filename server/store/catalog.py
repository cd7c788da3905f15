"""`Catalog`: ``catalog.sqlite`` (WAL): the collections (spec, creation time, pinned embedder) and the job table.

CRUD only: what a job does is the job runner's (``server/ingest/jobs.py``); a job row keeps its
progress, per-document errors and a JSON ``payload`` (what the runner needs to resume it, e.g.
the pending documents or source paths).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tritonrag.clients.wire.schema import NO_HEADER, CollectionCreate, DocumentError, JobInfo, JobStatus, ModelVersion
from tritonrag.server.errors import AlreadyExistsError, NotFoundError
from tritonrag.server.store.sqlite import connect, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    embedder TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    payload TEXT NOT NULL DEFAULT 'null',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, created_at);
"""
_JOB_COLUMNS = "id, collection, status, total, done, failed, errors, payload, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class JobTotals:
    """The jobs of one status: how many, and the sums of their documents, those done and those failed."""

    jobs: int
    documents: int
    done: int
    failed: int


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's public state and the JSON ``payload`` its runner keeps to resume it."""

    info: JobInfo
    payload: Any


class Catalog:
    """The catalog database; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        """Open or create the catalog at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(path)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)
        if "embedder" not in {row[1] for row in self._conn.execute("PRAGMA table_info(collections)")}:
            self._conn.execute("ALTER TABLE collections ADD COLUMN embedder TEXT")  # a catalog from before pinning

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def healthy(self) -> bool:
        """Whether the catalog answers a query."""
        try:
            with self._lock:
                self._conn.execute("SELECT count(*) FROM collections").fetchone()
        except sqlite3.Error:
            return False
        return True

    # --- collections --------------------------------------------------------------------------

    def create_collection(self, spec: CollectionCreate, embedder: ModelVersion | None = None) -> None:
        """Record a new collection, pinned to ``embedder`` when given; `AlreadyExistsError` if the name is taken."""
        pinned = None if embedder is None else embedder.model_dump_json()
        try:
            with self._lock, transaction(self._conn) as conn:
                conn.execute(
                    "INSERT INTO collections(name, spec, created_at, embedder) VALUES (?, ?, ?, ?)",
                    (spec.name, spec.model_dump_json(), time.time(), pinned),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExistsError(f"collection {spec.name!r} already exists", field="name") from None

    def get_collection(self, name: str) -> CollectionCreate:
        """The spec of the collection ``name`` (a key ``<tenant>/<name>``: the spec's name is that key);
        `NotFoundError` if there is none. A spec from before chunk headers (0.3) has none: its chunks were
        embedded without."""
        spec = json.loads(self._collection_column(name, "spec"))
        spec.setdefault("chunking", {}).setdefault("header", NO_HEADER.model_dump())
        spec["name"] = name.rpartition("/")[2]  # validated as the name its tenant gave
        return CollectionCreate.model_validate(spec).model_copy(update={"name": name})

    def collection_created_at(self, name: str) -> float:
        """When the collection ``name`` was created (Unix time); `NotFoundError` if there is none."""
        return float(self._collection_column(name, "created_at"))

    def collection_embedder(self, name: str) -> ModelVersion | None:
        """The embedder version the collection ``name`` is pinned to; None while it is not pinned (created while
        the embedder was down, or before pinning); `NotFoundError` if there is none."""
        pinned = self._collection_column(name, "embedder")
        return None if pinned is None else ModelVersion.model_validate_json(pinned)

    def pin_collection(self, name: str, embedder: ModelVersion) -> None:
        """Record that the collection ``name`` is pinned to ``embedder`` (its vectors are that version's)."""
        with self._lock:
            self._conn.execute("UPDATE collections SET embedder = ? WHERE name = ?", (embedder.model_dump_json(), name))

    def pinned_embedders(self) -> dict[str, ModelVersion | None]:
        """Each collection's pinned embedder version (None: not pinned), by name."""
        with self._lock:
            rows = self._conn.execute("SELECT name, embedder FROM collections ORDER BY name").fetchall()
        return {name: None if pinned is None else ModelVersion.model_validate_json(pinned) for name, pinned in rows}

    def _collection_column(self, name: str, column: Literal["spec", "created_at", "embedder"]) -> Any:
        with self._lock:
            row = self._conn.execute(f"SELECT {column} FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"collection {name!r} does not exist", field="collection")
        return row[0]

    def list_collections(self) -> list[str]:
        """The names of every collection, sorted."""
        with self._lock:
            rows = self._conn.execute("SELECT name FROM collections ORDER BY name").fetchall()
        return [row[0] for row in rows]

    def rename_collection(self, name: str, new_name: str) -> None:
        """Give the collection ``name`` and its jobs the name ``new_name``, in one transaction."""
        with self._lock, transaction(self._conn) as conn:
            conn.execute("UPDATE collections SET name = ? WHERE name = ?", (new_name, name))
            conn.execute("UPDATE jobs SET collection = ? WHERE collection = ?", (new_name, name))

    def delete_collection(self, name: str) -> None:
        """Forget the collection ``name`` (its jobs stay, as history); `NotFoundError` if there is none."""
        with self._lock:
            deleted = self._conn.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount
        if not deleted:
            raise NotFoundError(f"collection {name!r} does not exist", field="collection")

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(self, collection: str, total: int, payload: Any = None) -> JobRecord:
        """Record a new ``queued`` job over ``total`` documents with its resumable ``payload`` (JSON)."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._lock, transaction(self._conn) as conn:
            conn.execute(
                "INSERT INTO jobs(id, collection, status, total, payload, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, collection, JobStatus.queued.value, total, json.dumps(payload), now, now),
            )
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord:
        """The job ``job_id``; `NotFoundError` if there is none."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
        return _job(row)

    def update_job(
        self,
        job_id: str,
        *,
        status: JobStatus | None = None,
        total: int | None = None,
        done: int | None = None,
        failed: int | None = None,
        errors: Sequence[DocumentError] | None = None,
        payload: Any = None,
    ) -> JobRecord:
        """Set the given fields (None leaves a field as it is) and ``updated_at``; returns the job."""
        changes: dict[str, Any] = {
            "status": None if status is None else status.value,
            "total": total,
            "done": done,
            "failed": failed,
            "errors": None if errors is None else json.dumps([error.model_dump() for error in errors]),
            "payload": None if payload is None else json.dumps(payload),
        }
        columns = [column for column, value in changes.items() if value is not None]
        assignments = "".join(f"{column} = ?, " for column in columns)
        with self._lock:
            updated = self._conn.execute(
                f"UPDATE jobs SET {assignments}updated_at = ? WHERE id = ?",
                (*(changes[column] for column in columns), time.time(), job_id),
            ).rowcount
        if not updated:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
        return self.get_job(job_id)

    def list_jobs(self, status: JobStatus | None = None, collection: str | None = None) -> list[JobRecord]:
        """Jobs, oldest first, optionally only those with ``status`` and/or of ``collection``."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs "
                "WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR collection = ?2) ORDER BY created_at, id",
                (None if status is None else status.value, collection),
            ).fetchall()
        return [_job(row) for row in rows]

    def job_totals(self) -> dict[JobStatus, JobTotals]:
        """The totals of the jobs of each status that has any."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, count(*), sum(total), sum(done), sum(failed) FROM jobs GROUP BY status"
            ).fetchall()
        return {JobStatus(status): JobTotals(*totals) for status, *totals in rows}

    def delete_job(self, job_id: str) -> None:
        """Forget the job ``job_id``; `NotFoundError` if there is none."""
        with self._lock:
            deleted = self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
        if not deleted:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")


def _job(row: tuple[Any, ...]) -> JobRecord:
    job_id, collection, status, total, done, failed, errors, payload, created_at, updated_at = row
    info = JobInfo(
        id=job_id,
        collection=collection,
        status=JobStatus(status),
        total=total,
        done=done,
        failed=failed,
        errors=[DocumentError.model_validate(error) for error in json.loads(errors)],
        created_at=created_at,
        updated_at=updated_at,
    )
    return JobRecord(info, json.loads(payload))

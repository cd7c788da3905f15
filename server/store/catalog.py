"""`Catalog`: the collections (spec, creation time, pinned embedder) and the job table, in ``catalog.sqlite``
(WAL) or in the shared PostgreSQL database (``store.url``), where every orchestrator replica sees the same.

CRUD only: what a job does is the job runner's (``server/ingest/jobs.py``); a job row keeps its
progress, per-document errors and a JSON ``payload`` (what the runner needs to resume it, e.g.
the pending documents or source paths).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tritonrag.clients.wire.schema import (
    NO_HEADER,
    CollectionCreate,
    DocumentError,
    DocumentIn,
    JobInfo,
    JobStatus,
    ModelVersion,
)
from tritonrag.server.errors import AlreadyExistsError, NotFoundError
from tritonrag.server.store.database import StoreLocation, add_missing_column

CATALOG = "catalog"  # the catalog's store name (its schema, in a shared database)
_DOCUMENT_BATCH = 500  # job documents inserted per statement
_TABLES = MetaData()
_collections = Table(
    "collections",
    _TABLES,
    Column("name", Text, primary_key=True),
    Column("spec", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("embedder", Text),
)
_jobs = Table(
    "jobs",
    _TABLES,
    Column("id", Text, primary_key=True),
    Column("collection", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("errors", Text, nullable=False, server_default="[]"),
    Column("payload", Text, nullable=False, server_default="null"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),  # also the runner's heartbeat: see `claim_job`
    Column("owner", Text),  # the runner that runs it (`claim_job`)
    Index("jobs_by_status", "status", "created_at"),
)
_job_documents = Table(  # an upsert job's documents, in order, until the job finishes
    "job_documents",
    _TABLES,
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("document", Text, nullable=False),
)


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
    """The catalog: an SQLite file, or a schema of the shared database; thread-safe."""

    def __init__(self, path: Path, location: StoreLocation | None = None) -> None:
        """Open or create the catalog at ``path``, or in ``location``'s shared database (which the collections'
        stores then share too)."""
        self.location = location or StoreLocation()
        if not self.location.shared:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._database = self.location.database(path, CATALOG)
        self._lock = threading.Lock()  # one writer of this process at a time (SQLite's file lock queues others)
        self._closed = False
        with self._database.write() as conn:
            if self._database.dialect == "sqlite":
                _upgrade_sqlite(conn)
            self._database.create_tables(conn, _TABLES)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._closed = True
            self._database.close()

    def healthy(self) -> bool:
        """Whether the catalog is open and answers a query."""
        if self._closed:
            return False
        try:
            with self._database.read() as conn:
                conn.execute(select(func.count()).select_from(_collections)).scalar_one()
        except SQLAlchemyError:
            return False
        return True

    # --- collections --------------------------------------------------------------------------

    def create_collection(self, spec: CollectionCreate, embedder: ModelVersion | None = None) -> None:
        """Record a new collection, pinned to ``embedder`` when given; `AlreadyExistsError` if the name is taken."""
        pinned = None if embedder is None else embedder.model_dump_json()
        row = {"name": spec.name, "spec": spec.model_dump_json(), "created_at": time.time(), "embedder": pinned}
        try:
            with self._lock, self._database.write() as conn:
                conn.execute(insert(_collections).values(row))
        except IntegrityError:
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
        with self._lock, self._database.write() as conn:
            conn.execute(
                update(_collections).where(_collections.c.name == name).values(embedder=embedder.model_dump_json())
            )

    def pinned_embedders(self) -> dict[str, ModelVersion | None]:
        """Each collection's pinned embedder version (None: not pinned), by name."""
        query = select(_collections.c.name, _collections.c.embedder).order_by(_collections.c.name)
        with self._database.read() as conn:
            rows = conn.execute(query).all()
        return {name: None if pinned is None else ModelVersion.model_validate_json(pinned) for name, pinned in rows}

    def _collection_column(self, name: str, column: Literal["spec", "created_at", "embedder"]) -> Any:
        with self._database.read() as conn:
            row = conn.execute(select(_collections.c[column]).where(_collections.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"collection {name!r} does not exist", field="collection")
        return row[0]

    def creation_times(self) -> dict[str, float]:
        """When each collection was created, by name: together they say which collections exist and which were
        created again under a name."""
        with self._database.read() as conn:
            return dict(conn.execute(select(_collections.c.name, _collections.c.created_at)).tuples().all())

    def list_collections(self) -> list[str]:
        """The names of every collection, sorted."""
        with self._database.read() as conn:
            return list(conn.execute(select(_collections.c.name).order_by(_collections.c.name)).scalars())

    def rename_collection(self, name: str, new_name: str) -> None:
        """Give the collection ``name`` and its jobs the name ``new_name``, in one transaction."""
        with self._lock, self._database.write() as conn:
            conn.execute(update(_collections).where(_collections.c.name == name).values(name=new_name))
            conn.execute(update(_jobs).where(_jobs.c.collection == name).values(collection=new_name))

    def delete_collection(self, name: str) -> None:
        """Forget the collection ``name`` (its jobs stay, as history); `NotFoundError` if there is none."""
        with self._lock, self._database.write() as conn:
            deleted = conn.execute(delete(_collections).where(_collections.c.name == name)).rowcount
        if not deleted:
            raise NotFoundError(f"collection {name!r} does not exist", field="collection")

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(
        self, collection: str, total: int, payload: Any = None, documents: Sequence[DocumentIn] = ()
    ) -> JobRecord:
        """Record a new ``queued`` job over ``total`` documents with its resumable ``payload`` (JSON) and, for an
        upsert job, its ``documents`` (kept until `finish_job`), in one transaction."""
        job_id = uuid.uuid4().hex
        now = time.time()
        row = {
            "id": job_id,
            "collection": collection,
            "status": JobStatus.queued.value,
            "total": total,
            "payload": json.dumps(payload),
            "created_at": now,
            "updated_at": now,
        }
        with self._lock, self._database.write() as conn:
            conn.execute(insert(_jobs).values(row))
            _insert_documents(conn, job_id, documents)
        return self.get_job(job_id)

    def attach_job_documents(self, job_id: str, documents: Sequence[DocumentIn], payload: Any) -> None:
        """Replace the job's documents by ``documents`` and its payload by ``payload``, in one transaction."""
        with self._lock, self._database.write() as conn:
            conn.execute(delete(_job_documents).where(_job_documents.c.job_id == job_id))
            _insert_documents(conn, job_id, documents)
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(payload=json.dumps(payload)))

    def job_documents(self, job_id: str, start: int, limit: int) -> list[DocumentIn]:
        """Up to ``limit`` of the job's documents from position ``start`` on, in order."""
        c = _job_documents.c
        query = select(c.document).where(c.job_id == job_id, c.position >= start).order_by(c.position).limit(limit)
        with self._database.read() as conn:
            return [DocumentIn.model_validate_json(document) for document in conn.execute(query).scalars()]

    def job_document_ids(self, job_id: str, start: int) -> list[str]:
        """The ids of the job's documents from position ``start`` on, in order (read a batch at a time)."""
        ids: list[str] = []
        while batch := self.job_documents(job_id, start + len(ids), _DOCUMENT_BATCH):
            ids += [document.id for document in batch]
        return ids

    def claim_job(self, job_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Make ``owner`` the runner of the unfinished job ``job_id`` and mark it ``running``, unless another runner
        recorded progress on it within ``lease_s`` (0: take it regardless); the job, or None when it is finished,
        gone or another runner's. Runners record progress (`update_job`) at least every ``lease_s``."""
        now = time.time()
        c = _jobs.c
        claimable = (c.owner.is_(None)) | (c.owner == owner) | (c.updated_at < now - lease_s) | (lease_s <= 0)
        statement = (
            update(_jobs)
            .where(c.id == job_id, c.status.in_([JobStatus.queued.value, JobStatus.running.value]), claimable)
            .values(owner=owner, status=JobStatus.running.value, updated_at=now)
        )
        with self._lock, self._database.write() as conn:
            claimed = conn.execute(statement).rowcount
        return self.get_job(job_id) if claimed else None

    def finish_job(self, job_id: str, status: JobStatus, **fields: Any) -> JobRecord:
        """Record the job's end (``status`` and the fields `update_job` takes) and forget its documents."""
        record = self.update_job(job_id, status=status, **fields)
        with self._lock, self._database.write() as conn:
            conn.execute(delete(_job_documents).where(_job_documents.c.job_id == job_id))
        return record

    def get_job(self, job_id: str) -> JobRecord:
        """The job ``job_id``; `NotFoundError` if there is none."""
        with self._database.read() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
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
        values = {column: value for column, value in changes.items() if value is not None}
        with self._lock, self._database.write() as conn:
            statement = update(_jobs).where(_jobs.c.id == job_id).values(**values, updated_at=time.time())
            updated = conn.execute(statement).rowcount
        if not updated:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
        return self.get_job(job_id)

    def list_jobs(
        self, status: JobStatus | Collection[JobStatus] | None = None, collection: str | None = None
    ) -> list[JobRecord]:
        """Jobs, oldest first, optionally only those with ``status`` (one, or any of several: read at once, so a
        job that moves from one to another meanwhile is seen once) and/or of ``collection``."""
        query = select(_jobs).order_by(_jobs.c.created_at, _jobs.c.id)
        if status is not None:
            statuses = [status] if isinstance(status, JobStatus) else list(status)
            query = query.where(_jobs.c.status.in_([s.value for s in statuses]))
        if collection is not None:
            query = query.where(_jobs.c.collection == collection)
        with self._database.read() as conn:
            return [_job(row) for row in conn.execute(query)]

    def job_totals(self) -> dict[JobStatus, JobTotals]:
        """The totals of the jobs of each status that has any."""
        c = _jobs.c
        query = select(c.status, func.count(), func.sum(c.total), func.sum(c.done), func.sum(c.failed))
        with self._database.read() as conn:
            rows = conn.execute(query.group_by(c.status)).all()
        return {JobStatus(status): JobTotals(*(int(total) for total in totals)) for status, *totals in rows}

    def delete_job(self, job_id: str) -> None:
        """Forget the job ``job_id``; `NotFoundError` if there is none."""
        with self._lock, self._database.write() as conn:
            deleted = conn.execute(delete(_jobs).where(_jobs.c.id == job_id)).rowcount
        if not deleted:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")


def _insert_documents(conn: Connection, job_id: str, documents: Sequence[DocumentIn]) -> None:
    for start in range(0, len(documents), _DOCUMENT_BATCH):
        rows = [
            {"job_id": job_id, "position": start + i, "document": document.model_dump_json()}
            for i, document in enumerate(documents[start : start + _DOCUMENT_BATCH])
        ]
        conn.execute(insert(_job_documents), rows)


def _upgrade_sqlite(conn: Connection) -> None:
    """Bring a catalog written by an earlier version to today's tables (new tables are created after)."""
    add_missing_column(conn, "collections", "embedder", "TEXT")  # before pinning
    add_missing_column(conn, "jobs", "owner", "TEXT")  # before job claims


def _job(row: Row[Any]) -> JobRecord:
    info = JobInfo(
        id=row.id,
        collection=row.collection,
        status=JobStatus(row.status),
        total=row.total,
        done=row.done,
        failed=row.failed,
        errors=[DocumentError.model_validate(error) for error in json.loads(row.errors)],
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
    return JobRecord(info, json.loads(row.payload))

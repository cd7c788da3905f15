"""Catalog: collections and jobs, in catalog.sqlite and in a shared PostgreSQL database."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from tritonrag.clients.wire.schema import NO_HEADER, ChunkHeader, CollectionCreate, DocumentError, IndexType, JobStatus
from tritonrag.server.errors import AlreadyExistsError, NotFoundError
from tritonrag.server.store.catalog import Catalog, JobTotals
from tritonrag.server.store.database import StoreLocation


@pytest.fixture
def catalog(tmp_path: Path, store_location: StoreLocation) -> Catalog:
    return Catalog(tmp_path / "catalog.sqlite", store_location)


def test_collections_crud(catalog: Catalog) -> None:
    spec = CollectionCreate(name="docs", index_type=IndexType.hnsw)
    catalog.create_collection(spec)
    catalog.create_collection(CollectionCreate(name="alpha"))
    assert catalog.get_collection("docs") == spec
    assert 0 < catalog.collection_created_at("docs") <= time.time()
    with pytest.raises(AlreadyExistsError):
        catalog.create_collection(CollectionCreate(name="docs"))
    assert catalog.list_collections() == ["alpha", "docs"]
    catalog.delete_collection("docs")
    for call in (
        lambda: catalog.get_collection("docs"),
        lambda: catalog.collection_created_at("docs"),
        lambda: catalog.delete_collection("docs"),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert catalog.healthy()
    catalog.close()
    assert not catalog.healthy()


def test_jobs_crud_and_filters(catalog: Catalog) -> None:
    first = catalog.create_job("docs", total=3, payload={"documents": [{"id": "a"}]})
    second = catalog.create_job("other", total=1)
    assert first.info.status is JobStatus.queued and first.payload == {"documents": [{"id": "a"}]}
    assert second.payload is None
    errors = [DocumentError(doc_id="b", error="empty text")]
    updated = catalog.update_job(first.info.id, status=JobStatus.running, done=2, failed=1, errors=errors)
    assert (updated.info.done, updated.info.failed, updated.info.errors) == (2, 1, errors)
    assert updated.payload == first.payload and updated.info.updated_at >= first.info.updated_at
    assert catalog.update_job(first.info.id, payload=[]).payload == []
    assert [job.info.id for job in catalog.list_jobs()] == [first.info.id, second.info.id]
    assert [job.info.id for job in catalog.list_jobs(status=JobStatus.running)] == [first.info.id]
    assert [job.info.id for job in catalog.list_jobs(collection="other")] == [second.info.id]
    assert catalog.list_jobs(status=JobStatus.failed) == []
    both = catalog.list_jobs(status=(JobStatus.queued, JobStatus.running))  # one read of either status
    assert [job.info.id for job in both] == [first.info.id, second.info.id]
    assert [job.info.id for job in catalog.list_jobs(status=[JobStatus.failed, JobStatus.running])] == [first.info.id]
    catalog.delete_job(second.info.id)
    for call in (
        lambda: catalog.get_job(second.info.id),
        lambda: catalog.update_job(second.info.id, done=1),
        lambda: catalog.delete_job(second.info.id),
    ):
        with pytest.raises(NotFoundError):
            call()


def test_catalog_survives_reopen(tmp_path: Path, store_location: StoreLocation) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite", store_location)
    catalog.create_collection(CollectionCreate(name="docs"))
    job = catalog.create_job("docs", total=5, payload={"paths": ["/data/a.txt"]})
    assert catalog.job_totals()[JobStatus.queued] == JobTotals(jobs=1, documents=5, done=0, failed=0)
    catalog.close()
    reopened = Catalog(tmp_path / "catalog.sqlite", store_location)
    assert reopened.get_collection("docs").name == "docs"
    assert reopened.get_job(job.info.id) == job


def test_a_spec_from_before_chunk_headers_has_none(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.create_collection(CollectionCreate(name="old"))
    spec = json.loads(catalog._collection_column("old", "spec"))
    del spec["chunking"]["header"]
    with sqlite3.connect(tmp_path / "catalog.sqlite") as conn:
        conn.execute("UPDATE collections SET spec = ? WHERE name = 'old'", (json.dumps(spec),))
    conn.close()
    assert catalog.get_collection("old").chunking.header == NO_HEADER
    catalog.create_collection(CollectionCreate(name="new"))
    assert catalog.get_collection("new").chunking.header == ChunkHeader()

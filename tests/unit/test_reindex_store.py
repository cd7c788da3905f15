"""Blue/green re-index at the store and collection level: next vectors side by side with the live ones, the
atomic switch of vectors, width and pinned version, writes during a re-index, crash safety; the catalog's pin
column and its migration; re-index jobs in the job runner; the services over a stand-in Triton: a collection from
before pinning pinned at start, and searched by its pinned version alone."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from tests.unit.test_retrieval_collection import REPO, open_collection
from tests.unit.test_services import DIMENSION as STAND_IN_DIMENSION
from tests.unit.test_services import StandInPool
from tests.unit.test_services import vector as stand_in_vector
from tests.unit.test_store_documents import DIM, prepared
from tritonrag.clients.wire.schema import (
    CollectionCreate,
    DocumentIn,
    Filter,
    JobStatus,
    ModelVersion,
    SearchMode,
    SearchRequest,
)
from tritonrag.server.config import IndexSettings, IngestSettings, ModelSettings
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.ingest.jobs import JobRunner, ReindexStep
from tritonrag.server.retrieval.collection import (
    ChunkSpan,
    Collection,
    EmbedderChangedError,
    PreparedDocument,
    ScoredChunk,
)
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.retrieval.stages import DenseRetrieval, Embedding, SearchStages
from tritonrag.server.routing.triton_pool import TritonPool
from tritonrag.server.services.collections import CollectionService
from tritonrag.server.services.models import ModelService
from tritonrag.server.services.search import SearchService
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.store.database import sqlite_database
from tritonrag.server.store.documents import DocumentStore

V1 = ModelVersion(name="embedder", version="1")
V2 = ModelVersion(name="embedder", version="2")
V3 = ModelVersion(name="embedder", version="3")
NEXT_DIM = 6  # version 2 is narrower


def next_vector(chunk_id: int, dimension: int = NEXT_DIM) -> npt.NDArray[np.float32]:
    """Version 2's vector of chunk ``chunk_id``: a function of the id alone, unit length."""
    vector = np.random.default_rng(1000 + chunk_id).standard_normal(dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


def reindex_all(collection: Collection, target: ModelVersion = V2, dimension: int = NEXT_DIM) -> int:
    """Give every chunk its next vector (``next_vector``), a few at a time; returns how many were added."""
    added = 0
    while (progress := collection.begin_reindex(target, dimension, limit=3)).missing:
        ids, _ = collection.texts(progress.pending)
        added += collection.add_next(target, ids, np.stack([next_vector(i, dimension) for i in ids.tolist()]))
    return added


def top(collection: Collection, vector: npt.NDArray[np.float32]) -> tuple[int, float]:
    """The top dense hit of ``vector``: its chunk id and its cosine, rounded (1.0: the very vector)."""
    [hit] = collection.search_dense(vector, 1)
    return hit.chunk_id, round(hit.score, 4)


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[Collection]:
    """A collection pinned to version 1 with four documents of two chunks each (chunk ids 1..8)."""
    collection = open_collection(tmp_path / "c")
    collection.upsert([prepared(f"d{n}", [f"doc {n} first", f"doc {n} second"], seed=n) for n in range(4)], V1)
    yield collection
    collection.close()


def test_next_vectors_stay_beside_the_live_ones_until_the_switch_replaces_vectors_width_and_version(
    pinned: Collection,
) -> None:
    [live] = pinned.chunks([3])
    assert pinned.embedder == V1 and reindex_all(pinned) == 8
    revision = pinned.revision
    assert top(pinned, live.vector) == (3, 1.0)  # version 1 serves until the switch
    assert pinned.embedder == V1 and pinned.revision == revision
    assert pinned.switch_embedder(V2, NEXT_DIM)
    assert pinned.embedder == V2 and pinned.revision == revision + 1
    assert top(pinned, next_vector(3)) == (3, 1.0)
    assert np.allclose(pinned.chunks([3])[0].vector, next_vector(3))
    with pytest.raises(InvalidArgumentError):  # a version-1 query no longer fits
        pinned.search_dense(live.vector, 1)


def test_a_reopened_collection_serves_the_pinned_version_at_its_stored_width(
    pinned: Collection, tmp_path: Path
) -> None:
    reindex_all(pinned)
    assert pinned.switch_embedder(V2, NEXT_DIM)
    pinned.close()
    spec = CollectionCreate(name="test")
    assert Collection.stored_dimension(tmp_path / "c", "test") == NEXT_DIM
    with pytest.raises(InvalidArgumentError):
        Collection.open(tmp_path / "c", spec, DIM)
    reopened = Collection.open(tmp_path / "c", spec, NEXT_DIM)
    try:
        assert reopened.embedder == V2 and reopened.info().chunks == 8
        assert top(reopened, next_vector(5)) == (5, 1.0)
    finally:
        reopened.close()


def test_writes_during_a_reindex_are_caught_up_before_the_switch(pinned: Collection) -> None:
    reindex_all(pinned)
    pinned.upsert([prepared("late", ["written during the re-index"], seed=9)], V1)  # chunk 9, version 1
    pinned.delete(["d0"])  # chunks 1 and 2 go, with their next vectors
    assert not pinned.switch_embedder(V2, NEXT_DIM)  # chunk 9 has no next vector: nothing changes
    assert pinned.embedder == V1 and top(pinned, pinned.chunks([9])[0].vector)[0] == 9
    assert reindex_all(pinned) == 1
    assert pinned.switch_embedder(V2, NEXT_DIM)
    assert pinned.info().chunks == 7
    assert top(pinned, next_vector(9)) == (9, 1.0)
    assert 1 not in {hit.chunk_id for hit in pinned.search_dense(next_vector(1), 10)}


def test_an_upsert_embedded_by_the_former_version_after_the_switch_is_refused(pinned: Collection) -> None:
    reindex_all(pinned)
    assert pinned.switch_embedder(V2, NEXT_DIM)
    with pytest.raises(EmbedderChangedError):
        pinned.upsert([prepared("late", ["embedded by version 1"])], V1)
    assert pinned.info().chunks == 8
    late = prepared("late", ["embedded by version 2"])
    pinned.upsert([late.__class__(late.document, late.chunks, next_vector(99)[None, :])], V2)
    assert pinned.info().chunks == 9


def test_a_crash_with_next_vectors_half_filled_serves_the_old_version_and_the_reindex_resumes(
    pinned: Collection, tmp_path: Path
) -> None:
    progress = pinned.begin_reindex(V2, NEXT_DIM, limit=4)
    ids, _ = pinned.texts(progress.pending)
    pinned.add_next(V2, ids, np.stack([next_vector(i) for i in ids.tolist()]))
    before = [(c.chunk_id, c.vector.tolist()) for c in pinned.chunks(list(range(1, 9)))]
    pinned.close()
    reopened = open_collection(tmp_path / "c")  # the old width: the old vectors serve
    try:
        assert reopened.embedder == V1
        assert [(c.chunk_id, c.vector.tolist()) for c in reopened.chunks(list(range(1, 9)))] == before
        assert top(reopened, np.asarray(before[6][1], np.float32)) == (7, 1.0)
        assert reopened.begin_reindex(V2, NEXT_DIM, limit=10).missing == 4  # the next vectors made are kept
        assert reindex_all(reopened) == 4 and reopened.switch_embedder(V2, NEXT_DIM)
    finally:
        reopened.close()


def test_a_crash_after_the_switch_commit_rebuilds_a_dense_snapshot_of_the_former_version(tmp_path: Path) -> None:
    """Same width, other vectors: the FAISS snapshot written before the switch must not be served after it."""
    collection = open_collection(tmp_path / "c")
    collection.upsert([prepared(f"d{n}", [f"doc {n}"], seed=n) for n in range(3)], V1)
    collection.close()  # the dense snapshot holds version 1's vectors
    store = DocumentStore(sqlite_database(tmp_path / "c" / "store.sqlite"), DIM)
    store.begin_next(V2, DIM)
    store.put_next(V2, store.chunk_ids(), np.stack([next_vector(i, DIM) for i in (1, 2, 3)]))
    assert store.switch(V2) is not None  # committed; the process dies before the collection saw it
    store.close()
    reopened = open_collection(tmp_path / "c")
    try:
        assert reopened.embedder == V2
        assert top(reopened, next_vector(2, DIM)) == (2, 1.0)
    finally:
        reopened.close()


def test_a_reindex_to_another_target_drops_the_next_vectors_of_the_former_one(pinned: Collection) -> None:
    reindex_all(pinned)
    assert pinned.begin_reindex(V3, NEXT_DIM, limit=1).missing == 8
    with pytest.raises(EmbedderChangedError):
        pinned.add_next(V2, np.array([1]), next_vector(1)[None, :])
    with pytest.raises(EmbedderChangedError):
        pinned.switch_embedder(V2, NEXT_DIM)
    assert pinned.embedder == V1


def test_pinning_keeps_the_first_pin(tmp_path: Path) -> None:
    collection = open_collection(tmp_path / "c")
    try:
        assert collection.embedder is None
        assert collection.pin(V1) == V1 and collection.pin(V2) == V1
        with pytest.raises(EmbedderChangedError):
            collection.upsert([prepared("a", ["by version 2"])], V2)
    finally:
        collection.close()
    store = DocumentStore(sqlite_database(tmp_path / "c" / "store.sqlite"), DIM)
    assert store.embedder == V1
    store.close()


def test_the_first_ingest_pins_an_unpinned_collection(tmp_path: Path) -> None:
    collection = open_collection(tmp_path / "c")
    try:
        collection.upsert([prepared("a", ["first"])], V2)
        assert collection.embedder == V2
    finally:
        collection.close()


# --- catalog -------------------------------------------------------------------------------------


def test_a_catalog_from_before_pinning_gains_the_column_with_collections_unpinned(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE collections (name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL)")
        conn.execute(
            "INSERT INTO collections VALUES ('old', ?, 1.0)", (CollectionCreate(name="old").model_dump_json(),)
        )
    conn.close()
    catalog = Catalog(path)
    try:
        assert catalog.collection_embedder("old") is None
        catalog.create_collection(CollectionCreate(name="new"), V2)
        assert catalog.pinned_embedders() == {"new": V2, "old": None}
        catalog.pin_collection("old", V1)
        assert catalog.collection_embedder("old") == V1
        with pytest.raises(NotFoundError):
            catalog.collection_embedder("none")
    finally:
        catalog.close()
    reopened = Catalog(path)
    assert reopened.pinned_embedders() == {"new": V2, "old": V1}
    reopened.close()


# --- jobs ----------------------------------------------------------------------------------------


class Steps:
    """A re-index of ``total`` chunks, ``per_step`` a step; ``gone`` makes a step find the collection deleted."""

    def __init__(self, total: int, per_step: int) -> None:
        self.total, self.per_step, self.done = total, per_step, 0
        self.calls: list[tuple[str, ModelVersion]] = []
        self.gone = False

    async def __call__(self, collection: str, target: ModelVersion) -> ReindexStep:
        self.calls.append((collection, target))
        if self.gone:
            raise NotFoundError(f"collection {collection!r} was deleted during its re-index")
        self.done = min(self.total, self.done + self.per_step)
        return ReindexStep(self.done, self.total, finished=self.done == self.total)


async def no_upsert(collection: str, documents: object) -> int:
    raise AssertionError("no upserts here")


def test_a_reindex_job_records_its_progress_and_is_not_submitted_twice(tmp_path: Path) -> None:
    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        steps = Steps(total=10, per_step=4)
        runner = JobRunner(catalog, no_upsert, IngestSettings(), reindex=steps)
        first = await runner.submit_reindex("t/c", V2)
        assert (await runner.submit_reindex("t/c", V2)).id == first.id
        assert [(info.id, target) for info, target in await runner.reindexes("t/c")] == [(first.id, V2)]
        await runner.start()
        done = await asyncio.wait_for(runner.wait(first.id), 10)
        await runner.close()
        assert (done.status, done.done, done.total, done.failed) == (JobStatus.succeeded, 10, 10, 0)
        assert steps.calls == [("t/c", V2)] * 3 and await runner.reindexes() == []
        catalog.close()

    asyncio.run(scenario())


def test_a_reindex_job_of_a_deleted_collection_ends_failed_saying_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        steps = Steps(total=10, per_step=4)
        steps.gone = True
        runner = JobRunner(catalog, no_upsert, IngestSettings(), reindex=steps)
        job = await runner.submit_reindex("t/c", V2)
        await runner.start()
        done = await asyncio.wait_for(runner.wait(job.id), 10)
        await runner.close()
        assert done.status is JobStatus.failed and "deleted" in done.errors[0].error
        catalog.close()

    asyncio.run(scenario())


def test_a_running_reindex_job_resumes_at_the_next_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        job = await JobRunner(catalog, no_upsert).submit_reindex("t/c", V2)
        catalog.update_job(job.id, status=JobStatus.running, total=10, done=4)  # as a killed runner left it
        steps = Steps(total=10, per_step=4)
        steps.done = 4
        runner = JobRunner(catalog, no_upsert, IngestSettings(), reindex=steps)
        await runner.start()
        done = await asyncio.wait_for(runner.wait(job.id), 10)
        await runner.close()
        assert (done.status, done.done, done.total) == (JobStatus.succeeded, 10, 10) and len(steps.calls) == 2
        catalog.close()

    asyncio.run(scenario())


# --- a kill at any point -------------------------------------------------------------------------

KILLED_CHILD = """
import sys
from pathlib import Path
from tests.unit.test_reindex_store import reindexing_child
reindexing_child(Path(sys.argv[1]))
"""
KILLED_CHUNKS = 40


def version_vector(version: str, chunk_id: int) -> npt.NDArray[np.float32]:
    """Embedder ``version``'s vector of chunk ``chunk_id`` (DIM wide, as every version here is)."""
    vector = np.random.default_rng(int(version) * 100_000 + chunk_id).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def reindexing_child(directory: Path) -> None:
    """Ingest with version 1, then re-index to versions 2, 3, … in turn, printing each version once switched."""
    collection = open_collection(directory, snapshot_interval_s=0.01)
    if collection.embedder is None:
        documents = [prepared(f"d{n}", [f"doc {n} a", f"doc {n} b"]) for n in range(KILLED_CHUNKS // 2)]
        vectors = [np.stack([version_vector("1", 2 * n + 1), version_vector("1", 2 * n + 2)]) for n in range(20)]
        collection.upsert([replace(d, vectors=v) for d, v in zip(documents, vectors, strict=True)], V1)
    version = int(collection.embedder.version if collection.embedder else 1)
    while True:
        version += 1
        target = ModelVersion(name="embedder", version=str(version))
        while (progress := collection.begin_reindex(target, DIM, limit=7)).missing:
            ids = progress.pending
            collection.add_next(target, ids, np.stack([version_vector(target.version, i) for i in ids.tolist()]))
        assert collection.switch_embedder(target, DIM)
        print(target.version, flush=True)


def test_a_kill_at_any_point_of_reindexes_leaves_one_version_served_consistently(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    switched: list[str] = []
    for delay in np.random.default_rng(3).uniform(0.0, 0.05, size=4):  # four kills, each at a random moment
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child died"
        switched.append(line.strip())
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        collection = open_collection(tmp_path)
        try:
            pinned = collection.embedder
            assert pinned is not None and int(pinned.version) >= int(switched[-1])
            for chunk in collection.chunks(list(range(1, KILLED_CHUNKS + 1))):
                assert np.allclose(chunk.vector, version_vector(pinned.version, chunk.chunk_id), atol=1e-6)
                assert top(collection, chunk.vector) == (chunk.chunk_id, 1.0)
        finally:
            collection.close()


# --- services over a stand-in Triton -------------------------------------------------------------


async def stand_in_width() -> int:
    return STAND_IN_DIMENSION


def test_a_collection_from_before_pinning_is_pinned_at_start_and_searched_by_that_version_alone(
    tmp_path: Path,
) -> None:
    texts = {"cats": "cats purr and sleep all day", "tea": "green tea is brewed below boiling"}

    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        registry = CollectionRegistry(tmp_path, catalog, IndexSettings(), stand_in_width)
        collection = await registry.create(CollectionCreate(name="old"))
        collection.upsert(  # no version: written before pinning
            [
                PreparedDocument(DocumentIn(id=i, text=t), [ChunkSpan(t, 0, len(t))], stand_in_vector(t)[None, :])
                for i, t in texts.items()
            ]
        )
        assert collection.embedder is None and catalog.collection_embedder("old") is None
        pool = StandInPool()
        triton = cast(TritonPool, pool)
        models = ModelService(triton, tmp_path, ModelSettings())
        service = CollectionService(registry, models, Embedding(triton), IngestSettings())
        await service.start()
        assert collection.embedder == V1 and catalog.collection_embedder("old") == V1
        assert (await service.get_collection("old")).embedder == V1
        assert await service.embedder_versions_in_use() == {"1"}
        search = SearchService(registry, SearchStages.over(triton))
        request = SearchRequest(collection="old", query=texts["cats"])
        found = await search.search(request)
        assert found.degraded == [] and found.hits[0].doc_id == "cats" and "dense" in found.hits[0].scores
        pool.versions["embedder"] = "2"  # version 1 is no longer served: BM25 alone, never version 2's vectors
        embedded = len(pool.embedded)
        found = await search.search(request)
        assert found.degraded == ["embed"] and found.hits[0].doc_id == "cats" and "dense" not in found.hits[0].scores
        assert len(pool.embedded) == embedded
        await service.close()
        await registry.close()
        catalog.close()

    asyncio.run(scenario())


class TwoVersions(StandInPool):
    """Serves embedder versions 1 (16 wide) and 2 (8 wide, another space), noting the version of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.versions_used: list[str | None] = []

    async def embed(
        self,
        texts: Sequence[str],
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        bulk: bool = False,
        version: str | None = None,
    ) -> npt.NDArray[np.float32]:
        self.versions_used.append(version)
        return np.stack([stand_in_vector(text, STAND_IN_DIMENSION if version == "1" else 8) for text in texts])


class SwitchingDense(DenseRetrieval):
    """Dense retrieval that first switches a collection pinned to version 1 to version 2, as a re-index's switch
    that lands between a search's embedding and its dense search."""

    async def run(
        self, collection: Collection, vector: npt.NDArray[np.float32], depth: int, filters: Filter | None
    ) -> list[ScoredChunk]:
        if collection.embedder == V1:
            assert await asyncio.to_thread(collection.switch_embedder, V2, 8)
        return await super().run(collection, vector, depth, filters)


def test_a_switch_during_a_search_makes_it_embed_the_query_again_with_the_new_version(tmp_path: Path) -> None:
    texts = {"cats": "cats purr and sleep all day", "tea": "green tea is brewed below boiling"}

    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite")
        registry = CollectionRegistry(tmp_path, catalog, IndexSettings(), stand_in_width)
        collection = await registry.create(CollectionCreate(name="docs"), V1, STAND_IN_DIMENSION)
        spans = {i: [ChunkSpan(t, 0, len(t))] for i, t in texts.items()}
        vectors = {i: stand_in_vector(t)[None, :] for i, t in texts.items()}
        collection.upsert([PreparedDocument(DocumentIn(id=i, text=t), spans[i], vectors[i]) for i, t in texts.items()])
        progress = collection.begin_reindex(V2, 8, limit=10)
        ids, chunk_texts = collection.texts(progress.pending)
        collection.add_next(V2, ids, np.stack([stand_in_vector(text, 8) for text in chunk_texts]))
        pool = TwoVersions()
        stages = replace(SearchStages.over(cast(TritonPool, pool)), dense=SwitchingDense())
        found = await SearchService(registry, stages).search(
            SearchRequest(collection="docs", query=texts["tea"], mode=SearchMode.dense)
        )
        assert pool.versions_used == ["1", "2"] and collection.embedder == V2
        assert found.degraded == [] and found.hits[0].doc_id == "tea" and round(found.hits[0].score, 4) == 1.0
        await registry.close()
        catalog.close()

    asyncio.run(scenario())

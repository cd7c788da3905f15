"""Collections of several processes over one shared PostgreSQL store: each keeps its own derived indexes (FAISS,
BM25 of chunks and of documents) and brings them to the store by following its revision log."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_reindex_store import NEXT_DIM, V1, V2, next_vector, reindex_all
from tests.unit.test_retrieval_collection import open_collection
from tests.unit.test_store_documents import DIM, prepared
from tritonrag.clients.wire.schema import CollectionCreate, IndexType
from tritonrag.deploy.launcher import free_port
from tritonrag.server.config import IndexSettings
from tritonrag.server.errors import NotFoundError
from tritonrag.server.retrieval.collection import Collection
from tritonrag.server.retrieval.following import follow_store
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.store.database import StoreLocation


@pytest.fixture
def location(postgres_url: str) -> Iterator[StoreLocation]:
    shared = StoreLocation(postgres_url)
    yield shared
    shared.close()


@pytest.fixture
def replicas(tmp_path: Path, location: StoreLocation) -> Iterator[tuple[Collection, Collection]]:
    """One collection opened by two replicas, each with its derived indexes in a directory of its own."""
    first = open_collection(tmp_path / "a", location=location)
    second = open_collection(tmp_path / "b", location=location)
    yield first, second
    first.close()
    second.close()


def sparse_docs(collection: Collection, query: str, k: int = 10) -> set[str]:
    hits = collection.search_sparse(query, k)
    return set(collection.documents_of([hit.chunk_id for hit in hits]).values())


def indexed(collection: Collection) -> tuple[list[int], list[int], list[int]]:
    """The ids each derived index holds: dense chunks, lexical chunks, document keys."""
    return (
        collection._dense.ids().tolist(),
        collection._lexical.ids().tolist(),
        collection._documents.ids().tolist(),
    )


def test_a_write_through_one_replica_is_searchable_through_the_other_after_it_follows(
    replicas: tuple[Collection, Collection],
) -> None:
    first, second = replicas
    first.upsert([prepared("owls", ["owls hunt at night", "owls see in the dark"], seed=1)], V1)
    assert second.revision == 0 and sparse_docs(second, "owls") == set()
    assert second.follow() == first.revision == 1
    assert sparse_docs(second, "owls") == {"owls"}
    [stored] = first.chunks([2])
    assert second.search_dense(stored.vector, 1)[0].chunk_id == 2
    assert second.search_documents("dark", 5) == pytest.approx(first.search_documents("dark", 5))
    assert second.embedder == V1  # the first write pinned the store
    assert indexed(second) == indexed(first) == ([1, 2], [1, 2], [1])


def test_interleaved_writes_of_two_replicas_leave_both_at_the_same_revision_and_ids(
    replicas: tuple[Collection, Collection],
) -> None:
    """A replica's own write first applies the other's earlier writes, so its indexes move one revision at a
    time; replacements and deletes made elsewhere remove what they removed."""
    first, second = replicas
    first.upsert([prepared("a", ["alpha one", "alpha two"], seed=1), prepared("b", ["beta"], seed=2)], V1)
    second.upsert([prepared("a", ["alpha replaced"], seed=3)], V1)  # replaces chunks 1 and 2 with 4
    first.delete(["b"])
    second.upsert([prepared("c", ["gamma"], seed=4)], V1)
    assert second.revision == 4 and first.revision == 3
    first.follow()
    assert first.revision == second.revision == 4
    assert indexed(first) == indexed(second) == ([4, 5], [4, 5], [4, 5])
    assert sparse_docs(first, "alpha") == {"a"} and first.chunks([4])[0].text == "alpha replaced"
    assert sparse_docs(second, "beta") == set()
    assert first.follow() == 4  # nothing new: idempotent


def test_a_new_replica_builds_its_indexes_from_the_store_then_follows(
    replicas: tuple[Collection, Collection], tmp_path: Path, location: StoreLocation
) -> None:
    first, _ = replicas
    first.upsert([prepared(f"d{n}", [f"document {n}"], seed=n) for n in range(5)], V1)
    late = open_collection(tmp_path / "late", location=location)
    try:
        assert late.revision == 1 and indexed(late) == indexed(first)
        first.delete(["d0", "d1"])
        first.upsert([prepared("d9", ["document nine"], seed=9)], V1)
        assert late.follow() == 3 and indexed(late) == indexed(first)
    finally:
        late.close()


def test_a_switch_made_elsewhere_rebuilds_the_followers_dense_index_at_the_new_width(
    replicas: tuple[Collection, Collection],
) -> None:
    first, second = replicas
    first.upsert([prepared(f"d{n}", [f"doc {n} first", f"doc {n} second"], seed=n) for n in range(4)], V1)
    second.follow()
    reindex_all(first)
    assert first.switch_embedder(V2, NEXT_DIM)
    assert second.embedder == V1
    second.follow()
    assert second.embedder == V2 and second.revision == first.revision
    assert second.search_dense(next_vector(3), 1)[0].chunk_id == 3
    second.upsert([prepared("new", ["after the switch"], vectors=next_vector(99)[None, :])], V2)  # at the new width
    first.follow()
    assert first.search_dense(next_vector(99), 1)[0].chunk_id == 9


def test_an_hnsw_follower_never_hides_a_chunk_it_applies_twice(tmp_path: Path, location: StoreLocation) -> None:
    """HNSW removes by tombstone: applying an entry again must not tombstone ids it already holds."""
    first = open_collection(tmp_path / "a", IndexType.hnsw, location=location)
    second = open_collection(tmp_path / "b", IndexType.hnsw, location=location)
    try:
        first.upsert([prepared(f"d{n}", [f"doc {n}"], seed=n) for n in range(6)], V1)
        second.follow()
        second._apply(second._store.changes_since(0)[0])  # the same entry once more
        [stored] = first.chunks([3])
        assert second.search_dense(stored.vector, 1)[0].chunk_id == 3
        assert len(second._dense) == 6 and np.array_equal(second._dense.ids(), np.arange(1, 7))
    finally:
        first.close()
        second.close()


def test_registries_follow_the_store_when_notified_and_forget_collections_deleted_elsewhere(
    tmp_path: Path, location: StoreLocation
) -> None:
    """Two replicas' registries over one shared catalog and store: a write through one is searchable through the
    other well within the polling interval (the notification wakes it); a collection deleted through one is closed
    by the other."""

    async def dimension() -> int:
        return DIM

    async def scenario() -> None:
        registries = [
            CollectionRegistry(
                tmp_path / name, Catalog(tmp_path / name / "catalog.sqlite", location), IndexSettings(), dimension, 30.0
            )
            for name in ("a", "b")
        ]
        writer, reader = registries
        await writer.create(CollectionCreate(name="notes").model_copy(update={"name": "t/notes"}))
        for registry in registries:
            await registry.start()
        try:
            assert await reader.names() == ["t/notes"]
            written = await writer.get("t/notes")
            following = await reader.get("t/notes")
            await asyncio.to_thread(written.upsert, [prepared("owls", ["owls hunt at night"], seed=1)], V1)
            started = time.monotonic()
            while following.revision < written.revision:
                assert time.monotonic() - started < 10, "the follower did not catch up"
                await asyncio.sleep(0.01)
            assert time.monotonic() - started < 5  # notified: well before the 30 s polling interval
            assert sparse_docs(following, "owls") == {"owls"}
            await writer.delete("t/notes")
            await reader.follow_all()
            assert following.closed and not (tmp_path / "b" / "collections" / "t" / "notes").exists()
            with pytest.raises(NotFoundError):
                await reader.get("t/notes")
        finally:
            for registry in registries:
                await registry.close()
                registry.catalog.close()

    asyncio.run(scenario())


def test_without_notifications_a_registry_still_follows_every_interval(tmp_path: Path, location: StoreLocation) -> None:
    """The polling fallback: a follower that cannot listen (here: the listener's database is unreachable) reads the
    log every interval anyway."""

    async def dimension() -> int:
        return DIM

    async def scenario() -> None:
        catalog = Catalog(tmp_path / "catalog.sqlite", location)
        registry = CollectionRegistry(tmp_path / "r", catalog, IndexSettings(), dimension)
        await registry.create(CollectionCreate(name="notes").model_copy(update={"name": "t/notes"}))
        following = await registry.get("t/notes")
        writer = Collection.open(tmp_path / "writer", following.spec, DIM, location=location)  # another process
        unreachable = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
        task = asyncio.create_task(follow_store(registry.follow_all, unreachable, 0.2))
        try:
            await asyncio.to_thread(writer.upsert, [prepared("owls", ["owls hunt at night"], seed=1)], V1)
            started = time.monotonic()
            while following.revision < 1:
                assert time.monotonic() - started < 10, "the follower did not poll"
                await asyncio.sleep(0.05)
            assert sparse_docs(following, "owls") == {"owls"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()
            await registry.close()
            catalog.close()

    asyncio.run(scenario())

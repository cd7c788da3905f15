"""DocumentStore: the source of truth of one collection, on each backend (SQLite files, PostgreSQL)."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import TypeAdapter

from tritonrag.clients.wire.schema import DocumentIn, Filter, Metadata
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.retrieval.filters import compile_filter
from tritonrag.server.store.database import Database, StoreLocation, sqlite_database
from tritonrag.server.store.documents import (
    ChunkSpan,
    DocumentStore,
    PreparedDocument,
    stored_dimension,
    unit_vectors,
    with_header,
)

DIM = 8


def prepared(
    doc_id: str,
    texts: Sequence[str],
    metadata: Metadata | None = None,
    vectors: npt.NDArray[np.float32] | None = None,
    seed: int = 0,
) -> PreparedDocument:
    """A document whose chunks are ``texts`` (joined by spaces), with random or given vectors."""
    spans, start = [], 0
    for text in texts:
        spans.append(ChunkSpan(text, start, start + len(text)))
        start += len(text) + 1
    if vectors is None:
        vectors = np.random.default_rng(seed).standard_normal((len(texts), DIM)).astype(np.float32)
    return PreparedDocument(DocumentIn(id=doc_id, text=" ".join(texts), metadata=metadata or {}), spans, vectors)


def database(location: StoreLocation, tmp_path: Path, name: str = "tenant/c") -> Database:
    """The store ``name``: a file under ``tmp_path``, or a schema of the test's PostgreSQL database."""
    return location.database(tmp_path / "store.sqlite", name)


@pytest.fixture
def store(store_location: StoreLocation, tmp_path: Path) -> Iterator[DocumentStore]:
    store = DocumentStore(database(store_location, tmp_path), DIM)
    yield store
    store.close()


def test_upsert_then_get_and_chunks(store: DocumentStore) -> None:
    change = store.upsert([prepared("a", ["one two", "three"], {"lang": "en", "tags": ["x", "y"]})])
    assert change.revision == store.revision == 1
    assert change.added.tolist() == [1, 2] and change.removed.tolist() == []
    doc = store.get("a")
    assert (doc.text, doc.metadata, doc.chunks) == ("one two three", {"lang": "en", "tags": ["x", "y"]}, 2)
    chunks = store.chunks([2, 99, 1])
    assert [(c.chunk_id, c.text, c.start, c.end) for c in chunks] == [(2, "three", 8, 13), (1, "one two", 0, 7)]
    assert chunks[0].metadata == {"lang": "en", "tags": ["x", "y"]}
    assert np.allclose(np.linalg.norm(chunks[0].vector), 1.0)  # stored L2-normalised
    assert store.counts() == (1, 2)


def test_upsert_replaces_all_chunks_and_ids_are_never_reused(store: DocumentStore) -> None:
    store.upsert([prepared("a", ["1", "2", "3"])])
    change = store.upsert([prepared("a", ["4"])])
    assert change.removed.tolist() == [1, 2, 3] and change.added.tolist() == [4]
    assert store.get("a").chunks == 1 and store.chunk_ids().tolist() == [4]
    store.delete(["a"])
    assert store.upsert([prepared("b", ["5"])]).added.tolist() == [5]  # AUTOINCREMENT: 4 is not reused


def test_delete_counts_existing_documents_and_bumps_generation_only_on_change(store: DocumentStore) -> None:
    store.upsert([prepared("a", ["1"]), prepared("b", ["2", "3"])])
    change = store.delete(["b", "missing"])
    assert change.documents == 1 and change.removed.tolist() == [2, 3] and change.revision == 2
    assert store.delete(["missing"]).revision == 2
    with pytest.raises(NotFoundError):
        store.get("b")


def test_invalid_writes_change_nothing(store: DocumentStore) -> None:
    with pytest.raises(InvalidArgumentError, match="2 chunks but 1 vectors"):
        store.upsert([prepared("a", ["1", "2"], vectors=np.ones((1, DIM), np.float32))])
    with pytest.raises(InvalidArgumentError, match="non-zero"):
        store.upsert([prepared("a", ["1"], vectors=np.zeros((1, DIM), np.float32))])
    with pytest.raises(InvalidArgumentError, match="twice"):
        store.upsert([prepared("a", ["1"]), prepared("a", ["2"])])
    assert store.revision == 0 and store.counts() == (0, 0)


def test_unit_vectors_checks_width() -> None:
    assert np.allclose(unit_vectors([3.0, 4.0], 2, "v"), [[0.6, 0.8]])
    with pytest.raises(InvalidArgumentError) as raised:
        unit_vectors(np.ones((2, 3)), 2, "vector")
    assert raised.value.field == "vector"


def test_reopen_keeps_data_and_checks_dimension(store_location: StoreLocation, tmp_path: Path) -> None:
    assert stored_dimension(database(store_location, tmp_path)) is None  # and nothing was created
    store = DocumentStore(database(store_location, tmp_path), DIM)
    store.upsert([prepared("a", ["1", "2"])])
    store.close()
    assert stored_dimension(database(store_location, tmp_path)) == DIM
    reopened = DocumentStore(database(store_location, tmp_path), DIM)
    assert reopened.revision == 1 and reopened.counts() == (1, 2)
    reopened.close()
    with pytest.raises(InvalidArgumentError, match="8-d"):
        DocumentStore(database(store_location, tmp_path), DIM + 1)
    (tmp_path / "other").mkdir()
    other = DocumentStore(database(store_location, tmp_path / "other", "tenant/other"), DIM + 1)  # its own tables
    assert other.counts() == (0, 0)
    other.close()


def test_two_stores_of_one_collection_write_in_turn_and_see_each_others_writes(
    store_location: StoreLocation, tmp_path: Path
) -> None:
    """Two processes' stores of one collection (two orchestrator replicas over a shared database; two opens of one
    file): revisions interleave without gaps, chunk ids never collide, and ``refresh`` reads the other's writes."""
    first = DocumentStore(database(store_location, tmp_path), DIM)
    second = DocumentStore(database(store_location, tmp_path), DIM)
    errors: list[BaseException] = []

    def write(store: DocumentStore, prefix: str) -> None:
        try:
            for i in range(10):
                store.upsert([prepared(f"{prefix}{i}", [f"{prefix}{i} one", f"{prefix}{i} two"], seed=i)])
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=write, args=(s, p)) for s, p in ((first, "a"), (second, "b"))]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not errors
    assert first.refresh() == second.refresh() == 20
    log = first.changes_since(0)
    assert [entry.revision for entry in log] == list(range(1, 21))
    added = np.concatenate([entry.added for entry in log])
    assert len(set(added.tolist())) == 40 and sorted(added.tolist()) == first.chunk_ids().tolist()
    assert second.counts() == (20, 40)
    first.close()
    second.close()


def test_the_revision_log_records_each_write_in_order(store: DocumentStore) -> None:
    store.upsert([prepared("a", ["1", "2"]), prepared("b", ["3"])])
    store.upsert([prepared("a", ["4"])])
    store.delete(["b", "missing"])
    store.delete(["missing"])  # changes nothing: not logged
    log = store.changes_since(0)
    assert [(e.revision, e.kind, e.documents) for e in log] == [(1, "upsert", 2), (2, "upsert", 1), (3, "delete", 1)]
    assert [(e.added.tolist(), e.removed.tolist()) for e in log] == [([1, 2, 3], []), ([4], [1, 2]), ([], [3])]
    assert [e.revision for e in store.changes_since(1)] == [2, 3] and store.changes_since(3) == []
    assert [e.revision for e in store.changes_since(0, limit=2)] == [1, 2]
    assert log[0].committed_at <= log[1].committed_at <= log[2].committed_at


def test_filters_select_the_same_documents_on_every_backend(store: DocumentStore) -> None:
    """Strings, numbers and booleans never equal one another; ranges compare numbers only; lists match by element;
    an integer beyond 64 bits compares as the float it is stored as."""
    store.upsert(
        [
            prepared("s5", ["x"], {"v": "5", "tags": ["red", "blue"]}),
            prepared("n5", ["x"], {"v": 5, "tags": ["blue"]}),
            prepared("f", ["x"], {"v": 2.5}),
            prepared("t", ["x"], {"v": True}),
            prepared("one", ["x"], {"v": 1}),
            prepared("big", ["x"], {"v": 2**64}),
            prepared("none", ["x"], {}),
        ]
    )

    def matching(filter_: Mapping[str, object]) -> list[str]:
        parsed = TypeAdapter(Filter).validate_python(filter_)
        return sorted(store.document_of(store.chunk_ids(compile_filter(parsed))).values())

    assert matching({"field": "v", "op": "eq", "value": "5"}) == ["s5"]
    assert matching({"field": "v", "op": "eq", "value": 5}) == ["n5"]
    assert matching({"field": "v", "op": "eq", "value": True}) == ["t"]  # not the number 1
    assert matching({"field": "v", "op": "eq", "value": 1}) == ["one"]
    assert matching({"field": "v", "op": "gt", "value": 2}) == ["big", "f", "n5"]
    assert matching({"field": "v", "op": "lte", "value": 2.5}) == ["f", "one"]
    assert matching({"field": "v", "op": "gte", "value": 2**64}) == ["big"]
    assert matching({"field": "v", "op": "in", "value": ["5", "x"]}) == ["s5"]
    assert matching({"field": "v", "op": "in", "value": [2.5, 5]}) == ["f", "n5"]
    assert matching({"field": "v", "op": "in", "value": []}) == []
    assert matching({"field": "tags", "op": "eq", "value": "blue"}) == ["n5", "s5"]
    both = {"and": [{"field": "tags", "op": "eq", "value": "blue"}, {"field": "v", "op": "eq", "value": 5}]}
    assert matching(both) == ["n5"]
    either = {"or": [{"field": "tags", "op": "eq", "value": "red"}, {"field": "v", "op": "lt", "value": 2}]}
    assert matching(either) == ["one", "s5"]
    removed = store.delete_where(compile_filter(TypeAdapter(Filter).validate_python(either)))
    assert removed.documents == 2 and store.counts() == (5, 5)


def test_iterators_and_sample(store: DocumentStore) -> None:
    store.upsert([prepared(f"d{i}", [f"t{i}a", f"t{i}b"], seed=i) for i in range(5)])
    ids, vectors = zip(*store.iter_vectors(), strict=True)
    assert np.concatenate(ids).tolist() == list(range(1, 11)) and np.concatenate(vectors).shape == (10, DIM)
    texts = [text for _, batch in store.iter_texts(np.array([4, 1], np.int64)) for text in batch]
    assert texts == ["t0a", "t1b"]
    assert store.sample_vectors(3).shape == (3, DIM) and store.sample_vectors(100).shape == (10, DIM)


def test_documents_are_keyed_by_their_first_chunk_and_indexed_texts_carry_the_header(store: DocumentStore) -> None:
    empty = PreparedDocument(DocumentIn(id="e", text="\u200b"), [], np.empty((0, DIM), np.float32))  # no tokens
    headed = dataclasses.replace(prepared("b", ["b1", "b2"], seed=2), header="Title B")
    change = store.upsert([prepared("a", ["a1", "a2", "a3"]), empty, headed])
    assert change.document_keys.tolist() == [1, 4] and change.document_texts == ["a1 a2 a3", "Title B\nb1 b2"]
    assert change.texts == ["a1", "a2", "a3", "Title B\nb1", "Title B\nb2"]
    assert store.document_keys().tolist() == [1, 4]
    assert [t for _, batch in store.iter_texts(np.array([5, 1], np.int64)) for t in batch] == ["a1", "Title B\nb2"]
    assert [t for _, batch in store.iter_texts() for t in batch][3:] == ["Title B\nb1", "Title B\nb2"]
    keys, texts = next(store.iter_document_texts(np.array([4, 1, 2], np.int64)))
    assert keys.tolist() == [1, 4] and texts == ["a1 a2 a3", "Title B\nb1 b2"]  # 2 is no document's key
    assert store.document_of([5, 2, 99]) == {5: "b", 2: "a"}
    assert store.chunks([4])[0].text == "b1" and store.get("b").text == "b1 b2"  # the header is never returned
    assert store.upsert([prepared("a", ["a4"])]).document_keys.tolist() == [6]
    assert store.document_keys().tolist() == [4, 6]


def test_a_store_from_before_headers_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    DocumentStore(sqlite_database(path), DIM).upsert([prepared("a", ["old chunk"])])
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE documents DROP COLUMN header")
    reopened = DocumentStore(sqlite_database(path), DIM)
    assert [t for _, batch in reopened.iter_texts() for t in batch] == ["old chunk"]
    reopened.upsert([dataclasses.replace(prepared("b", ["new"]), header="H")])
    assert [t for _, batch in reopened.iter_texts() for t in batch] == ["old chunk", "H\nnew"]


def test_a_text_that_starts_with_its_header_is_not_given_it_twice() -> None:
    assert with_header("Module  json", "Body") == "Module  json\nBody"
    assert with_header("Module json", "Module   json:\n\tencoder") == "Module   json:\n\tencoder"
    assert with_header("", "Body") == "Body"

"""DocumentStore: the SQLite source of truth of one collection."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.clients.wire.schema import DocumentIn, Metadata
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.documents import ChunkSpan, DocumentStore, PreparedDocument, unit_vectors, with_header

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


@pytest.fixture
def store(tmp_path: Path) -> DocumentStore:
    return DocumentStore(tmp_path / "store.sqlite", DIM)


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


def test_reopen_keeps_data_and_checks_dimension(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = DocumentStore(path, DIM)
    store.upsert([prepared("a", ["1", "2"])])
    store.close()
    reopened = DocumentStore(path, DIM)
    assert reopened.revision == 1 and reopened.counts() == (1, 2)
    reopened.close()
    with pytest.raises(InvalidArgumentError, match="8-d"):
        DocumentStore(path, DIM + 1)


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
    DocumentStore(path, DIM).upsert([prepared("a", ["old chunk"])])
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE documents DROP COLUMN header")
    reopened = DocumentStore(path, DIM)
    assert [t for _, batch in reopened.iter_texts() for t in batch] == ["old chunk"]
    reopened.upsert([dataclasses.replace(prepared("b", ["new"]), header="H")])
    assert [t for _, batch in reopened.iter_texts() for t in batch] == ["old chunk", "H\nnew"]


def test_a_text_that_starts_with_its_header_is_not_given_it_twice() -> None:
    assert with_header("Module  json", "Body") == "Module  json\nBody"
    assert with_header("Module json", "Module   json:\n\tencoder") == "Module   json:\n\tencoder"
    assert with_header("", "Body") == "Body"

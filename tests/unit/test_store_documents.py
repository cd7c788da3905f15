"""DocumentStore: the SQLite source of truth of one collection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.clients.wire.schema import DocumentIn, Metadata
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.documents import ChunkSpan, DocumentStore, PreparedDocument, unit_vectors

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

"""Collection: filters, writes, restart and recovery of derived indexes, concurrency, crash safety."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.test_store_documents import DIM, prepared
from tritonrag.clients.wire.schema import (
    And,
    CollectionCreate,
    Condition,
    Filter,
    IndexType,
    Language,
    Metadata,
    Or,
)
from tritonrag.server.config import DenseParams
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.retrieval.collection import DENSE_FILE, DOCUMENTS_DIR, LEXICAL_DIR, Collection
from tritonrag.server.store.documents import StoredChunk

PARAMS = DenseParams(nlist=8, nprobe=8, hnsw_m=16, auto_threshold=400, auto_kind=IndexType.ivf)
REPO = Path(__file__).resolve().parents[2]


def open_collection(directory: Path, index_type: IndexType = IndexType.flat, **options: Any) -> Collection:
    spec = CollectionCreate(name="test", index_type=index_type)
    return Collection.open(directory, spec, DIM, dense_params=PARAMS, **options)


@pytest.fixture
def collection(tmp_path: Path) -> Iterator[Collection]:
    opened = open_collection(tmp_path / "c")
    yield opened
    opened.close()


def snapshot_of(collection: Collection) -> dict[str, Any]:
    """What the store and both indexes hold, for comparison across restarts. BM25 scores are rounded: until
    segments merge, the lexical index's term statistics still count deleted chunks, so the same chunks
    score a little differently after a different history of writes (ranks are the same)."""
    query = np.random.default_rng(9).standard_normal(DIM).astype(np.float32)
    return {
        "chunks": collection.info().chunks,
        "dense": collection.search_dense(query, 20),
        "sparse": [(hit.chunk_id, round(hit.score, 3)) for hit in collection.search_sparse("common", 20)],
        "documents": {doc: round(score, 3) for doc, score in collection.search_documents("common", 20).items()},
        "ids": collection._store.chunk_ids().tolist(),
    }


def assert_indexes_match_store(collection: Collection) -> None:
    stored = collection._store.chunk_ids()
    np.testing.assert_array_equal(collection._dense.ids(), stored)
    np.testing.assert_array_equal(collection._lexical.ids(), stored)
    np.testing.assert_array_equal(collection._documents.ids(), collection._store.document_keys())


# --- filters ----------------------------------------------------------------------------------

META: dict[str, Metadata] = {
    "d0": {"lang": "en", "year": 2020, "tags": ["a", "b"], "score": 0.5, "draft": True},
    "d1": {"lang": "de", "year": 2021, "tags": ["b"], "score": 1.5, "draft": False},
    "d2": {"lang": "en", "year": 2022, "tags": [], "score": 2},
    "d3": {"lang": "fr", "year": 2023.0, "tags": ["c"], "code": "2023", "ids": [1, 2]},
}


@pytest.fixture
def with_metadata(collection: Collection) -> Collection:
    collection.upsert([prepared(doc_id, [f"{doc_id} common", "common"], meta) for doc_id, meta in META.items()])
    return collection


def matched(collection: Collection, filter_: Filter) -> set[str]:
    """The documents ``filter_`` lets through, by dense and by sparse search (which must agree)."""
    vector = np.ones(DIM, np.float32)
    by_dense = {c.doc_id for c in collection.chunks([h.chunk_id for h in collection.search_dense(vector, 50, filter_)])}
    hits = collection.search_sparse("common", 50, filter_)
    assert {c.doc_id for c in collection.chunks([h.chunk_id for h in hits])} == by_dense
    return by_dense


def cond(field: str, op: str, value: Any) -> Condition:
    return Condition.model_validate({"field": field, "op": op, "value": value})


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        (cond("lang", "eq", "en"), {"d0", "d2"}),
        (cond("year", "eq", 2023), {"d3"}),  # an int equals a float of the same value
        (cond("year", "eq", 2020.0), {"d0"}),
        (cond("draft", "eq", True), {"d0"}),
        (cond("draft", "eq", False), {"d1"}),
        (cond("code", "eq", 2023), set()),  # a number never equals a string
        (cond("year", "eq", "2023"), set()),
        (cond("tags", "eq", "b"), {"d0", "d1"}),  # eq on a list-valued field: any element
        (cond("lang", "in", ["de", "fr", "xx"]), {"d1", "d3"}),
        (cond("tags", "in", ["a", "c"]), {"d0", "d3"}),  # in on a list-valued field: any element
        (cond("ids", "in", [2, 5]), {"d3"}),
        (cond("lang", "in", []), set()),
        (cond("year", "gt", 2021), {"d2", "d3"}),
        (cond("year", "gte", 2021), {"d1", "d2", "d3"}),
        (cond("score", "lt", 1.5), {"d0"}),
        (cond("score", "lte", 1.5), {"d0", "d1"}),
        (cond("lang", "gt", 0), set()),  # a range never matches strings
        (cond("draft", "gte", 0), set()),  # nor booleans
        (cond("missing", "eq", "x"), set()),  # unknown fields match nothing
        (And.model_validate({"and": [cond("lang", "eq", "en"), cond("year", "gte", 2021)]}), {"d2"}),
        (Or.model_validate({"or": [cond("lang", "eq", "de"), cond("tags", "in", ["c"])]}), {"d1", "d3"}),
        (
            Or.model_validate(
                {
                    "or": [
                        {
                            "and": [
                                {"field": "lang", "op": "eq", "value": "en"},
                                {"field": "draft", "op": "eq", "value": True},
                            ]
                        },
                        {
                            "and": [
                                {"field": "year", "op": "gt", "value": 2022},
                                {"or": [{"field": "tags", "op": "in", "value": ["c"]}]},
                            ]
                        },
                    ]
                }
            ),
            {"d0", "d3"},
        ),
        (And.model_validate({"and": [cond("lang", "eq", "en"), cond("missing", "eq", 1)]}), set()),
    ],
)
def test_filter_operators(with_metadata: Collection, filter_: Filter, expected: set[str]) -> None:
    assert matched(with_metadata, filter_) == expected


def test_eq_with_a_list_is_rejected(with_metadata: Collection) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        with_metadata.search_dense(np.ones(DIM, np.float32), 5, cond("tags", "eq", ["a"]))
    assert raised.value.field == "filters"


@pytest.mark.parametrize("index_type", [IndexType.flat, IndexType.ivf, IndexType.hnsw])
def test_selective_filter_still_returns_k(tmp_path: Path, index_type: IndexType) -> None:
    collection = open_collection(tmp_path, index_type)
    docs = [prepared(f"d{i}", [f"text {i} common"], {"group": i % 33}, seed=i) for i in range(990)]
    collection.upsert(docs)
    assert collection.info().active_index == index_type.value
    only = cond("group", "eq", 0)  # 30 of 990 chunks, 3%
    query = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    hits = collection.search_dense(query, 10, only)
    allowed = [i for i in range(990) if i % 33 == 0]
    vectors = np.stack([prepared("x", ["x"], seed=i).vectors[0] for i in allowed])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = np.array(allowed)[np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:10]] + 1
    assert [hit.chunk_id for hit in hits] == expected.tolist()
    assert len(collection.search_sparse("common", 10, only)) == 10
    collection.close()


# --- writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("language", "stemmed"), [(Language.english, True), (Language.none, False)])
def test_the_collections_language_decides_stemming_and_stop_words(
    tmp_path: Path, language: Language, stemmed: bool
) -> None:
    spec = CollectionCreate(name="test", language=language)
    collection = Collection.open(tmp_path, spec, DIM, dense_params=PARAMS)
    collection.upsert([prepared("owl", ["The owls were hunting at night."]), prepared("cat", ["A cat sleeps."])])
    assert [h.chunk_id for h in collection.search_sparse("hunted owl", 5)] == ([1] if stemmed else [])
    assert bool(collection.search_sparse("the", 5)) is not stemmed  # a stop word in English
    collection.close()
    reopened = Collection.open(tmp_path, spec, DIM, dense_params=PARAMS)
    assert [h.chunk_id for h in reopened.search_sparse("hunted owl", 5)] == ([1] if stemmed else [])
    reopened.close()


def test_upsert_replaces_a_documents_chunks(collection: Collection) -> None:
    collection.upsert([prepared("a", ["alpha one", "alpha two", "alpha three"], {"v": 1})])
    old = collection.search_sparse("alpha", 10)
    collection.upsert([prepared("a", ["beta only"], {"v": 2}, seed=5)])
    assert collection.search_sparse("alpha", 10) == []
    assert [h.chunk_id for h in collection.search_sparse("beta", 10)] == [4]
    dense = collection.search_dense(np.ones(DIM, np.float32), 10)
    assert [h.chunk_id for h in dense] == [4] and not {h.chunk_id for h in old} & {4}
    document = collection.get("a")
    assert (document.text, document.metadata, document.chunks) == ("beta only", {"v": 2}, 1)
    assert matched(collection, cond("v", "eq", 1)) == set()
    assert collection.info().chunks == 1 and collection.revision == 2


def test_documents_are_searched_as_whole_texts_with_filters_before_the_cut(collection: Collection) -> None:
    collection.upsert(
        [
            prepared("owls", ["Owls hunt at night.", "They have soft feathers."], {"kind": "bird"}),
            prepared("cats", ["Cats hunt mice.", "Cats sleep in the day and hunt at night."], {"kind": "pet"}),
            prepared("tea", ["Tea is brewed.", "Feathers are not tea."], {"kind": "drink"}),
        ]
    )
    # Across chunks: "night" and "feathers" are in different chunks of "owls", and in one chunk of no document.
    found = collection.search_documents("night feathers", 10)
    assert next(iter(found)) == "owls" and set(found) == {"owls", "cats", "tea"}
    assert found["owls"] > max(found["cats"], found["tea"])
    assert set(collection.search_documents("night feathers", 10, cond("kind", "in", ["pet", "drink"]))) == {
        "cats",
        "tea",
    }
    assert list(collection.search_documents("night", 1)) == ["owls"]  # the shorter of the two documents with it
    collection.upsert([prepared("owls", ["Owls are birds."], {"kind": "bird"}, seed=3)])
    assert set(collection.search_documents("night", 10)) == {"cats"}
    collection.delete(["cats"])
    assert collection.search_documents("night", 10) == {}
    assert collection.documents_of([1, 5, 7, 999]) == {5: "tea", 7: "owls"}


def test_headers_are_indexed_but_never_returned(collection: Collection) -> None:
    header = "Strix aluco"
    document = prepared("owl", ["They hunt at night.", "Soft feathers."])
    collection.upsert([dataclasses.replace(document, header=header)])
    assert {h.chunk_id for h in collection.search_sparse("strix", 5)} == {1, 2}
    assert set(collection.search_documents("aluco", 5)) == {"owl"}
    assert [c.text for c in collection.chunks([1, 2])] == ["They hunt at night.", "Soft feathers."]
    assert collection.get("owl").text == "They hunt at night. Soft feathers."
    assert_indexes_match_store(collection)


def test_delete_by_id_and_by_filter(collection: Collection) -> None:
    collection.upsert([prepared(f"d{i}", [f"common {i}", "common"], {"even": i % 2 == 0}) for i in range(6)])
    assert collection.delete(["d0", "d1", "nope"]) == 2
    assert collection.delete(["nope"]) == 0
    with pytest.raises(NotFoundError):
        collection.get("d0")
    assert collection.delete_by_filter(cond("even", "eq", True)) == 2
    either = Or.model_validate({"or": [cond("even", "eq", True), cond("even", "eq", False)]})
    assert matched(collection, either) == {"d3", "d5"}
    assert len(collection.search_dense(np.ones(DIM, np.float32), 50)) == 4
    assert collection.info().documents == 2
    assert_indexes_match_store(collection)


def test_auto_index_switches_kind_and_back(tmp_path: Path) -> None:
    collection = open_collection(tmp_path, IndexType.auto)
    collection.upsert([prepared(f"d{i}", [f"common {i}"], seed=i) for i in range(399)])
    assert collection.info().active_index == "flat"
    collection.upsert([prepared("last", ["common last"], seed=1000)])
    assert collection.info().active_index == "ivf"  # 400 chunks: rebuilt from the store
    assert_indexes_match_store(collection)
    collection.delete([f"d{i}" for i in range(250)])
    assert collection.info().active_index == "flat"  # below half the threshold
    assert_indexes_match_store(collection)
    collection.close()


def test_hnsw_deletes_rebuild_when_tombstones_pile_up(tmp_path: Path) -> None:
    collection = open_collection(tmp_path, IndexType.hnsw)
    collection.upsert([prepared(f"d{i}", [f"common {i}"], seed=i) for i in range(100)])
    collection.delete([f"d{i}" for i in range(15)])
    assert collection._dense.ids().size == 85 and len(collection._dense._deleted) == 15
    collection.delete([f"d{i}" for i in range(15, 30)])
    assert len(collection._dense._deleted) == 0  # rebuilt from the store
    assert_indexes_match_store(collection)
    collection.close()


# --- restart and recovery ---------------------------------------------------------------------


def fill(collection: Collection, start: int, count: int) -> None:
    collection.upsert([prepared(f"d{i}", [f"common {i}", f"part {i}"], {"i": i}, seed=i) for i in range(start, count)])


@pytest.mark.parametrize("index_type", [IndexType.flat, IndexType.ivf, IndexType.hnsw])
def test_restart_serves_the_same_results(tmp_path: Path, index_type: IndexType) -> None:
    collection = open_collection(tmp_path, index_type)
    fill(collection, 0, 200)
    collection.delete(["d3"])
    before = snapshot_of(collection)
    collection.close()
    reopened = open_collection(tmp_path, index_type)
    assert snapshot_of(reopened) == before and reopened.revision == 2
    reopened.close()


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"not a snapshot at all")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bitflip":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])


@pytest.mark.parametrize("how", ["missing", "garbage", "truncated", "bitflip"])
def test_a_damaged_dense_snapshot_is_rebuilt_from_the_store(tmp_path: Path, how: str) -> None:
    collection = open_collection(tmp_path, IndexType.ivf)
    fill(collection, 0, 200)
    before = snapshot_of(collection)
    collection.close()
    damage(tmp_path / DENSE_FILE, how)
    reopened = open_collection(tmp_path, IndexType.ivf)
    assert snapshot_of(reopened) == before
    assert_indexes_match_store(reopened)
    reopened.close()
    assert (tmp_path / DENSE_FILE).is_file()  # written again


@pytest.mark.parametrize("how", ["missing", "garbage meta", "segments gone"])
@pytest.mark.parametrize("index_dir", [LEXICAL_DIR, DOCUMENTS_DIR])
def test_a_damaged_lexical_index_is_rebuilt_from_the_store(tmp_path: Path, how: str, index_dir: str) -> None:
    collection = open_collection(tmp_path)
    fill(collection, 0, 200)
    before = snapshot_of(collection)
    collection.close()
    lexical = tmp_path / index_dir
    if how == "missing":
        shutil.rmtree(lexical)
    elif how == "garbage meta":
        (lexical / "meta.json").write_text("not json at all")
    else:
        for segment in lexical.glob("*.idx"):
            segment.unlink()
    reopened = open_collection(tmp_path)
    assert snapshot_of(reopened) == before
    assert_indexes_match_store(reopened)
    reopened.close()


def test_the_former_sparse_snapshot_gives_way_to_the_lexical_index(tmp_path: Path) -> None:
    collection = open_collection(tmp_path)
    fill(collection, 0, 20)
    before = snapshot_of(collection)
    collection.close()
    shutil.rmtree(tmp_path / LEXICAL_DIR)
    (tmp_path / "sparse.bm25").write_bytes(b"an index file of an earlier version")
    reopened = open_collection(tmp_path)
    assert snapshot_of(reopened) == before and not (tmp_path / "sparse.bm25").exists()
    assert_indexes_match_store(reopened)
    reopened.close()


def test_stale_snapshots_are_reconciled_by_chunk_id(tmp_path: Path) -> None:
    collection = open_collection(tmp_path, IndexType.hnsw, snapshot_interval_s=3600)
    fill(collection, 0, 100)
    collection.snapshot()
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(tmp_path / DENSE_FILE, stale / DENSE_FILE)
    for index_dir in (LEXICAL_DIR, DOCUMENTS_DIR):
        shutil.copytree(tmp_path / index_dir, stale / index_dir)
    fill(collection, 100, 150)  # added after the snapshot
    collection.upsert([prepared("d5", ["replaced"], seed=99)])  # replaced after it
    collection.delete(["d7", "d120"])  # removed after it
    before = snapshot_of(collection)
    collection.close()
    # As if the process died before a newer snapshot, and before the lexical index's later commits.
    shutil.copy(stale / DENSE_FILE, tmp_path / DENSE_FILE)
    for index_dir in (LEXICAL_DIR, DOCUMENTS_DIR):
        shutil.rmtree(tmp_path / index_dir)
        shutil.copytree(stale / index_dir, tmp_path / index_dir)
    reopened = open_collection(tmp_path, IndexType.hnsw)
    assert snapshot_of(reopened) == before
    assert_indexes_match_store(reopened)
    (hit,) = reopened.search_sparse("replaced", 5)
    assert reopened.chunks([hit.chunk_id])[0].doc_id == "d5"
    reopened.close()


def test_a_changed_dimension_is_refused(tmp_path: Path) -> None:
    open_collection(tmp_path).close()
    with pytest.raises(InvalidArgumentError):
        Collection.open(tmp_path, CollectionCreate(name="test"), DIM + 1)


# --- concurrency ------------------------------------------------------------------------------

WRITERS, READERS, ROUNDS, DOCS_PER_WRITER = 8, 8, 12, 3


def versioned(writer: int, doc: int, version: int) -> Any:
    """Document ``w{writer}-{doc}`` at ``version``: ``4 * (version % 3 + 1)`` chunks, each tagged with both."""
    doc_id = f"w{writer}-{doc}"
    count = 4 * (version % 3 + 1)
    texts = [f"v{version} n{count} common" for _ in range(count)]
    return prepared(doc_id, texts, {"writer": writer, "version": version}, seed=version * 1000 + writer * 10 + doc)


def check_whole(chunks: list[StoredChunk], complete: bool) -> None:
    """Per document, the chunks a search returned come from one version; all of them if ``complete``."""
    by_doc: dict[str, list[str]] = {}
    for chunk in chunks:
        by_doc.setdefault(chunk.doc_id, []).append(chunk.text)
    for doc_id, texts in by_doc.items():
        tags = {tuple(text.split()[:2]) for text in texts}
        assert len(tags) == 1, f"a search saw two versions of {doc_id} at once: {tags}"
        ((version, count),) = tags
        assert not complete or len(texts) == int(count[1:]), f"a search saw {len(texts)} chunks of {doc_id} {version}"


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """Switch threads often, so that readers run in the middle of writes."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.usefixtures("fast_thread_switching")
def test_parallel_writers_and_readers(tmp_path: Path) -> None:
    collection = open_collection(tmp_path, IndexType.flat, snapshot_interval_s=0.2)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        for version in range(ROUNDS):
            batch = [versioned(w, d, version) for d in range(DOCS_PER_WRITER) if rng.random() < 0.8]
            if batch:
                collection.upsert(batch)
            if version % 5 == 4:
                collection.delete([f"w{w}-0"])
                collection.delete_by_filter(cond("version", "lt", version - 3))

    def reader(r: int) -> None:
        rng = np.random.default_rng(100 + r)
        while not done.is_set():
            w = int(rng.integers(WRITERS))
            searches = [
                partial(collection.search_sparse, "common", 10_000),
                partial(collection.search_dense, rng.standard_normal(DIM).astype(np.float32), 10_000),
                partial(collection.search_dense, np.ones(DIM, np.float32), 10_000, cond("writer", "eq", w)),
            ]
            for search in searches:
                revision = collection.revision
                chunks = collection.chunks([hit.chunk_id for hit in search()])
                # No commit between the search and the read: the search saw one whole state.
                check_whole(chunks, complete=collection.revision == revision)
            assert {chunk.metadata["writer"] for chunk in chunks} <= {w}

    def guarded(target: Any, arg: int) -> None:
        try:
            target(arg)
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=guarded, args=(writer, w)) for w in range(WRITERS)]
    readers = [threading.Thread(target=guarded, args=(reader, r)) for r in range(READERS)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert not errors, errors
    assert_indexes_match_store(collection)
    documents, chunks = collection._store.counts()
    assert len(collection._dense) == len(collection._lexical) == chunks
    stored = collection.chunks(collection._store.chunk_ids().tolist())
    check_whole(stored, complete=True)
    assert len({chunk.doc_id for chunk in stored}) == documents
    for chunk in stored:  # each chunk's vector is in FAISS under its id
        assert collection.search_dense(chunk.vector, 1)[0].chunk_id == chunk.chunk_id
    collection.close()
    reopened = open_collection(tmp_path, IndexType.flat)
    assert reopened._store.counts() == (documents, chunks)
    assert_indexes_match_store(reopened)
    reopened.close()


# --- crash safety -----------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from tests.unit.test_retrieval_collection import crash_child
crash_child(Path(sys.argv[1]))
"""


def crash_child(directory: Path) -> None:
    """Upsert batches in a loop, printing each document id once its upsert has returned."""
    collection = open_collection(directory, IndexType.flat, snapshot_interval_s=0.05)
    i = 0
    while True:
        batch = [crash_doc(i + j) for j in range(3)]
        collection.upsert(batch)
        print(" ".join(doc.document.id for doc in batch), flush=True)
        i += 3


def crash_doc(i: int) -> Any:
    count = i % 4 + 1
    return prepared(f"doc{i}", [f"doc{i} part{j} common" for j in range(count)], {"count": count}, seed=i)


def test_sigkill_loses_no_acknowledged_document(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line, "the child died"
        acknowledged += line.split()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(acknowledged) >= 150
    collection = open_collection(tmp_path, IndexType.flat)
    documents, _ = collection._store.counts()
    assert documents >= len(acknowledged) and documents % 3 == 0  # whole batches only
    assert_indexes_match_store(collection)
    for i in range(documents):  # every stored document is whole and searchable both ways
        doc_id = f"doc{i}"
        document = collection.get(doc_id)
        assert document.chunks == i % 4 + 1 == document.metadata["count"]
        hits = collection.search_sparse(doc_id, 10)
        assert len(hits) == document.chunks
        for chunk in collection.chunks([h.chunk_id for h in hits]):
            assert chunk.doc_id == doc_id
            assert collection.search_dense(chunk.vector, 1)[0].chunk_id == chunk.chunk_id
    assert set(acknowledged) <= {f"doc{i}" for i in range(documents)}
    collection.close()

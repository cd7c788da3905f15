"""Lexical retrieval libraries side by side, in process, on three known-item sets: which serves BM25.

Sets (all built offline, all chunked by the server's own chunker with the default chunking, a
document ranked at its best chunk):

* ``stdlib``: ``bench/retrieval_eval.py``'s labelled set: a module's docstring summary is the query, the
  rest of its docstring the one relevant document;
* ``pydoc``: ``bench/corpus.py``'s long-document corpus: each page's summary (the first docstring sentence
  of its module, class or function) is the query, the page itself the one relevant document;
* ``modules``: ``bench/retrieval_eval.py``'s set of that corpus's module pages: a class or function summary
  is the query, its module's page with that summary cut out the one relevant document.

Indexes over the same chunk texts:

* ``tantivy``: the server's ``LexicalIndex`` (tantivy, Rust, via its Python bindings): simple tokenizer,
  lower-casing, English stop words, Snowball English stemmer; BM25 (k1 1.2, b 0.75);
* ``fts5``: SQLite FTS5 with the ``porter unicode61`` tokenizer (no stop-word list exists in FTS5), ranked by
  ``bm25()``, in an SQLite file;
* ``bm25s``: the ``bm25s`` library with its English stop words and PyStemmer's English stemmer: the baseline.

Reported per set and index: nDCG@10, Recall@10, MRR@10; indexing seconds; query latency p50/p95 (top 50
chunks, one query at a time). Then latency at scale: the pydoc chunks repeated (as distinct chunks) up to
``--scale-chunks`` (default 100,000), the pydoc queries against ``tantivy``, top 50, alone and after the
check a served search makes first (``LexicalIndex.holds_phrase``: does some text hold the query verbatim).
(The hand-written index that tantivy replaced was measured beside them at commit e12250e; docs/BENCHMARKS.md.)

Run: ``.venv/bin/python bench/lexical.py`` (``--pydoc-documents N`` for a sample; default all).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from corpus import pydoc_documents, sample_documents
from embed import percentiles
from retrieval_eval import document_ranking, examples, module_examples
from stack import machine, markdown_table, model_repository, progress, version_dir

from tritonrag.clients.evaluation import ndcg_at, recall_at, reciprocal_rank_at
from tritonrag.clients.wire.schema import Chunking, Language
from tritonrag.server.ingest.chunking import Chunker
from tritonrag.server.retrieval.lexical import LexicalIndex

TOP_CHUNKS = 50


@dataclass(frozen=True)
class KnownItemSet:
    """Chunks (text and document id) and queries, each with its one relevant document."""

    name: str
    chunk_texts: list[str]
    chunk_docs: list[str]
    queries: list[tuple[str, str]]  # (query, relevant document id)


Search = Callable[[str, int], list[int]]  # (query, k) -> chunk positions, best first


def build_sets(pydoc_count: int | None, seed: int) -> list[KnownItemSet]:
    chunking = Chunking()
    chunker = Chunker.from_version_dir(
        version_dir(model_repository(None, ["embedder"]), "embedder"), chunking.chunk_tokens, chunking.overlap_tokens
    )
    sets = []
    stdlib = examples()
    pydoc = [page for page in sample_documents(pydoc_documents(), pydoc_count, seed) if page.summary]
    module_pages, module_queries = module_examples()
    for name, documents, queries in (  # (doc_id, text) and (query, relevant doc_id)
        ("stdlib", [(e.doc_id, e.document) for e in stdlib], [(e.query, e.doc_id) for e in stdlib]),
        ("pydoc", [(d.id, d.text) for d in pydoc], [(d.summary, d.id) for d in pydoc]),
        ("modules", [(e.doc_id, e.document) for e in module_pages], [(e.query, e.doc_id) for e in module_queries]),
    ):
        texts, docs = [], []
        for doc_id, text in documents:
            for span in chunker.chunk(text):
                texts.append(span.text)
                docs.append(doc_id)
        sets.append(KnownItemSet(name, texts, docs, queries))
        progress(f"{name}: {len(documents)} documents, {len(texts)} chunks")
    return sets


def served_index(texts: Sequence[str], work_dir: Path) -> LexicalIndex:
    """The server's own lexical index (``server/retrieval/lexical.py``), English, over ``texts`` by position."""
    index = LexicalIndex(work_dir / "tantivy", Language.english)
    index.write(np.empty(0, np.int64), np.arange(len(texts), dtype=np.int64), texts)
    index.refresh()
    return index


def tantivy_index(texts: Sequence[str], work_dir: Path) -> Search:
    """``served_index``'s ranking."""
    index = served_index(texts, work_dir)

    def search(query: str, k: int) -> list[int]:
        return [int(i) for i in index.search(query, k)[1]]

    return search


def fts5_index(texts: Sequence[str], work_dir: Path) -> Search:
    connection = sqlite3.connect(work_dir / "fts5.sqlite", check_same_thread=False)
    connection.execute("CREATE VIRTUAL TABLE chunks USING fts5(text, tokenize='porter unicode61')")
    with connection:
        connection.executemany(
            "INSERT INTO chunks(rowid, text) VALUES (?, ?)", [(i, text) for i, text in enumerate(texts)]
        )

    def search(query: str, k: int) -> list[int]:
        terms = [t for t in "".join(c if c.isalnum() else " " for c in query).split()]
        if not terms:
            return []
        match = " OR ".join(f'"{term}"' for term in terms)
        rows = connection.execute(
            "SELECT rowid FROM chunks WHERE chunks MATCH ? ORDER BY rank LIMIT ?", (match, k)
        ).fetchall()
        return [row[0] for row in rows]

    return search


def bm25s_index(texts: Sequence[str], _: Path) -> Search:
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(list(texts), stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False
    )

    def search(query: str, k: int) -> list[int]:
        tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, show_progress=False)
        if not tokens.vocab:
            return []
        results, _ = retriever.retrieve(tokens, k=min(k, len(texts)), show_progress=False, n_threads=1)
        return [int(i) for i in results[0]]

    return search


def verbatim_checked_index(texts: Sequence[str], work_dir: Path) -> Search:
    """``tantivy`` as a served search uses it: whether a text holds the query verbatim, then the ranking."""
    index = served_index(texts, work_dir)

    def search(query: str, k: int) -> list[int]:
        index.holds_phrase(query)
        return [int(i) for i in index.search(query, k)[1]]

    return search


INDEXES: dict[str, Callable[[Sequence[str], Path], Search]] = {
    "tantivy": tantivy_index,
    "fts5": fts5_index,
    "bm25s": bm25s_index,
}


def evaluate(known: KnownItemSet, name: str, work_dir: Path) -> list[str]:
    began = time.perf_counter()
    search = INDEXES[name](known.chunk_texts, work_dir)
    build_s = time.perf_counter() - began
    gains, found, reciprocal, latencies = [], 0.0, [], []
    for query, relevant in known.queries:
        began = time.perf_counter()
        positions = search(query, TOP_CHUNKS)
        latencies.append((time.perf_counter() - began) * 1e3)
        ranking = document_ranking([known.chunk_docs[p] for p in positions])
        gains.append(ndcg_at(ranking, [relevant]))
        reciprocal.append(reciprocal_rank_at(ranking, [relevant]))
        found += recall_at(ranking, [relevant])
    p50, p95 = percentiles(latencies, [50, 95])
    count = len(known.queries)
    progress(f"{known.name} / {name}: nDCG@10 {statistics.mean(gains):.3f}")
    return [
        known.name,
        name,
        f"{statistics.mean(gains):.3f}",
        f"{found / count:.3f}",
        f"{statistics.mean(reciprocal):.3f}",
        f"{build_s:.1f}",
        f"{p50:.2f}",
        f"{p95:.2f}",
    ]


def latency_at_scale(known: KnownItemSet, chunks: int) -> list[list[str]]:
    """Query latency of ``tantivy`` over ``known``'s chunks repeated up to ``chunks``."""
    repeats = -(-chunks // len(known.chunk_texts))
    texts = (known.chunk_texts * repeats)[:chunks]
    rows = []
    for name, index in (("tantivy", tantivy_index), ("tantivy + verbatim check", verbatim_checked_index)):
        with tempfile.TemporaryDirectory(prefix="lexical-") as work_dir:
            began = time.perf_counter()
            search = index(texts, Path(work_dir))
            build_s = time.perf_counter() - began
            latencies = []
            for query, _ in known.queries:
                began = time.perf_counter()
                search(query, TOP_CHUNKS)
                latencies.append((time.perf_counter() - began) * 1e3)
        p50, p95 = percentiles(latencies, [50, 95])
        progress(f"{chunks} chunks / {name}: p50 {p50:.2f} ms")
        rows.append([f"{len(texts):,}", name, f"{build_s:.1f}", f"{p50:.2f}", f"{p95:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pydoc-documents", type=int, help="a sample of the pydoc corpus (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-chunks", type=int, default=100_000, help="chunks of the latency-at-scale run")
    parser.add_argument("--scale-only", action="store_true", help="only the latency-at-scale run")
    args = parser.parse_args()
    rows = []
    sets = build_sets(args.pydoc_documents, args.seed)
    for known in [] if args.scale_only else sets:
        for name in INDEXES:
            with tempfile.TemporaryDirectory(prefix="lexical-") as work_dir:
                rows.append(evaluate(known, name, Path(work_dir)))
    print(f"## Lexical indexes, known-item, in process ({machine()})\n")
    if rows:
        header = ["set", "index", "nDCG@10", "Recall@10", "MRR@10", "index s", "query p50 ms", "query p95 ms"]
        print(markdown_table(header, rows, labels=2))
    pydoc = next(known for known in sets if known.name == "pydoc")
    scale = latency_at_scale(pydoc, args.scale_chunks)
    print(f"\nLatency at scale: the pydoc chunks repeated, {len(pydoc.queries)} pydoc queries, top {TOP_CHUNKS}\n")
    print(markdown_table(["chunks", "index", "index s", "query p50 ms", "query p95 ms"], scale, labels=2))


if __name__ == "__main__":
    main()

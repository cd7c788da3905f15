"""Retrieval quality of the search endpoint: nDCG@10, Recall@10 and MRR@10 per retrieval mode.

The labelled set is built offline from the documentation of Python's standard-library modules:
a module's summary (the first sentence of its docstring) is the query, the rest of its docstring
is the one relevant document. Docstrings of Python modules are read with ``ast`` (nothing is
imported); compiled modules are imported for theirs. Modules whose name has a private part, and
those with a summary under 3 or over 40 words or a remainder under 20 words, are left out.

Every document is upserted over HTTP into a fresh collection (default chunking, server-side).
Each query is searched once per mode of ``--modes`` (default: all) — dense, sparse, hybrid, and
hybrid+rerank of the top ``RERANK_TOP_N`` — with ``top_k = RERANK_TOP_N``, so that reranking
reorders exactly the hybrid candidates. Hits are chunks; a document's rank is that of its first
chunk. Queries run one at a time; the report gives the mean metrics and the per-query latency as
markdown on stdout. ``--documents`` and ``--queries`` draw smaller sets for a quick run.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corpus import docstrings, stdlib_dir
from embed import percentiles
from stack import machine, markdown_table, model_repository, progress, running_stack, split_summary

from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, SearchMode, SearchRequest

COLLECTION = "retrieval-eval"
CUTOFF = 10
RERANK_TOP_N = 20
SUMMARY_WORDS = (3, 40)
MIN_DOCUMENT_WORDS = 20
UPSERT_BATCH = 32
# A reranking of 20 chunks takes SmolLM2 seconds on a few CPU cores, more than the default 10 s a
# Triton call may take: quality is measured here, so the orchestrator waits as long as it takes.
PATIENT = {"TRITONRAG_ROUTING__ATTEMPT_TIMEOUT_S": "600", "TRITONRAG_ROUTING__REQUEST_TIMEOUT_S": "600"}


@dataclass(frozen=True)
class Example:
    """A module: its summary is the query, the rest of its docstring the relevant document."""

    module: str
    query: str
    document: str


@dataclass(frozen=True)
class Mode:
    """A search configuration under test."""

    label: str
    mode: SearchMode
    rerank: bool


MODES = (
    Mode("dense", SearchMode.dense, False),
    Mode("sparse", SearchMode.sparse, False),
    Mode("hybrid", SearchMode.hybrid, False),
    Mode("hybrid+rerank", SearchMode.hybrid, True),
)


def module_docstrings() -> Iterator[tuple[str, str]]:
    """``(module, docstring)`` of every public standard-library module: Python ones by ``ast``, compiled by import."""
    root: Path = stdlib_dir()

    def is_python(name: str) -> bool:
        path = root / name.replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    for name, doc in docstrings(root):  # modules, classes and functions, each module first
        if is_python(name) and not any(part.startswith("_") for part in name.split(".")):
            yield name, doc
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or is_python(name):
            continue
        try:
            doc = inspect.getdoc(importlib.import_module(name))
        except ImportError:  # another platform's module
            continue
        if doc:
            yield name, doc


def examples() -> list[Example]:
    """The labelled set: one example per module whose summary and remainder are long enough, by module name."""
    found: dict[str, Example] = {}
    for module, doc in module_docstrings():
        summary, rest = split_summary(doc)
        if SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1] and len(rest.split()) >= MIN_DOCUMENT_WORDS:
            found.setdefault(module, Example(module, summary, rest))
    return sorted(found.values(), key=lambda example: example.module)


def ndcg(rank: int | None) -> float:
    """nDCG@CUTOFF with one relevant document at 1-based ``rank`` (None: not retrieved)."""
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= CUTOFF else 0.0


def reciprocal_rank(rank: int | None) -> float:
    return 1.0 / rank if rank is not None and rank <= CUTOFF else 0.0


def document_rank(doc_ids: Sequence[str], relevant: str) -> int | None:
    """The 1-based rank of ``relevant`` among the distinct documents of the hits, in hit order."""
    ranking = list(dict.fromkeys(doc_ids))
    return ranking.index(relevant) + 1 if relevant in ranking else None


@dataclass
class Result:
    """One mode over every query."""

    ranks: list[int | None]
    latencies_ms: list[float]
    server_ms: dict[str, list[float]]


def evaluate(client: TritonRagClient, mode: Mode, queries: Sequence[Example]) -> Result:
    """Search every query in ``mode``, one at a time, after one unmeasured warm-up search."""

    def search(query: str) -> tuple[list[str], dict[str, float], float]:
        request = SearchRequest(
            collection=COLLECTION,
            query=query,
            top_k=RERANK_TOP_N,
            mode=mode.mode,
            rerank=mode.rerank,
            rerank_top_n=RERANK_TOP_N,
        )
        began = time.perf_counter()
        response = client.search(request)
        elapsed = (time.perf_counter() - began) * 1e3
        if response.degraded:
            raise RuntimeError(f"{mode.label}: the server skipped {response.degraded}")
        return [hit.doc_id for hit in response.hits], response.timings_ms, elapsed

    search(queries[0].query)
    result = Result([], [], {})
    for number, example in enumerate(queries, 1):
        doc_ids, timings, elapsed = search(example.query)
        result.ranks.append(document_rank(doc_ids, example.module))
        result.latencies_ms.append(elapsed)
        for stage, ms in timings.items():
            result.server_ms.setdefault(stage, []).append(ms)
        if number % 10 == 0:
            progress(f"{mode.label}: {number}/{len(queries)} queries")
    return result


def report(results: dict[str, Result], documents: int, chunks: int, queries: int) -> str:
    """The markdown report: metrics, client latency and the server's median stage timings per mode."""
    stages = ["embed", "search", "rerank", "total"]
    rows = []
    for label, result in results.items():
        p50, p95 = percentiles(result.latencies_ms, [50, 95])
        server = [
            f"{statistics.median(result.server_ms[stage]):.1f}" if stage in result.server_ms else "-"
            for stage in stages
        ]
        rows.append(
            [
                label,
                f"{statistics.mean(map(ndcg, result.ranks)):.3f}",
                f"{statistics.mean(rank is not None and rank <= CUTOFF for rank in result.ranks):.3f}",
                f"{statistics.mean(map(reciprocal_rank, result.ranks)):.3f}",
                f"{statistics.mean(rank is not None for rank in result.ranks):.3f}",
                f"{p50:.1f}",
                f"{p95:.1f}",
                *server,
            ]
        )
    header = ["mode", "nDCG@10", "Recall@10", "MRR@10", f"found in {RERANK_TOP_N} chunks", "p50 ms", "p95 ms"]
    header += [f"server {stage} ms" for stage in stages]
    return "\n".join(
        [
            f"{queries} queries over {documents} documents ({chunks} chunks), {RERANK_TOP_N} chunks a search "
            f"(hybrid+rerank: the hybrid {RERANK_TOP_N} reordered); {machine()}.",
            "",
            markdown_table(header, rows),
        ]
    )


def run(args: argparse.Namespace, work_dir: Path) -> str:
    """Index the labelled set in a stack started here and evaluate every mode; the markdown report."""
    models = ["embedder", "reranker"] if "hybrid+rerank" in args.modes else ["embedder"]
    repository = model_repository(args.repository, models)
    labelled = examples()
    if args.documents:
        labelled = sorted(random.Random(args.seed).sample(labelled, args.documents), key=lambda e: e.module)
    queries = random.Random(args.seed).sample(labelled, args.queries) if args.queries else labelled
    progress(f"{len(labelled)} documents, {len(queries)} queries; models from {repository}")
    data_dir = work_dir / "data"
    with (
        running_stack(repository, models, data_dir, work_dir, **PATIENT) as stack,
        TritonRagClient(stack.orchestrator.http_url, timeout_s=600) as client,
    ):
        client.create_collection(CollectionCreate(name=COLLECTION))
        chunks = 0
        for first in range(0, len(labelled), UPSERT_BATCH):
            batch = labelled[first : first + UPSERT_BATCH]
            documents = [DocumentIn(id=example.module, text=example.document) for example in batch]
            chunks += client.upsert(COLLECTION, documents).chunks
        progress(f"indexed {len(labelled)} documents as {chunks} chunks")
        results = {mode.label: evaluate(client, mode, queries) for mode in MODES if mode.label in args.modes}
    return report(results, len(labelled), chunks, len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--documents", type=int, help="index only this many modules, drawn at random (default: all)")
    parser.add_argument("--queries", type=int, help="evaluate only this many of them, drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    labels = [mode.label for mode in MODES]
    parser.add_argument("--modes", nargs="+", choices=labels, default=labels, help="modes to evaluate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(run(args, Path(work_dir)))


if __name__ == "__main__":
    main()

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

``--embedder DIR [DIR ...]`` evaluates the given embedder version directories instead of the
repository's embedder (e.g. an int8 export, or ``bench/int8.py``'s variants), one stack each, in one
table side by side: each is served as version 1 of ``embedder`` in a repository of its own (a
symbolic link to the directory, with the ``config.pbtxt`` beside it, else the project's template).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corpus import docstrings, stdlib_dir
from embed import percentiles
from stack import machine, markdown_table, model_repository, progress, running_stack, split_summary, version_dir

from tritonrag.clients.evaluation import ndcg_at, recall_at, reciprocal_rank_at
from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, SearchMode, SearchRequest

COLLECTION = "retrieval-eval"
CONFIG_TEMPLATE = Path(__file__).resolve().parents[1] / "model_repository" / "embedder" / "config.pbtxt"
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


def document_ranking(doc_ids: Sequence[str]) -> list[str]:
    """The distinct documents of the hits, in hit order (a document ranks at its best chunk)."""
    return list(dict.fromkeys(doc_ids))


@dataclass
class Result:
    """One mode over every query: each query's document ranking and its one relevant document."""

    rankings: list[list[str]]
    relevant: list[str]
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
    result = Result([], [], [], {})
    for number, example in enumerate(queries, 1):
        doc_ids, timings, elapsed = search(example.query)
        result.rankings.append(document_ranking(doc_ids))
        result.relevant.append(example.module)
        result.latencies_ms.append(elapsed)
        for stage, ms in timings.items():
            result.server_ms.setdefault(stage, []).append(ms)
        if number % 10 == 0:
            progress(f"{mode.label}: {number}/{len(queries)} queries")
    return result


def metric_cells(result: Result) -> list[str]:
    """nDCG@10, Recall@10, MRR@10 (``tritonrag eval``'s) and the share found among the chunks, as table cells."""
    pairs = list(zip(result.rankings, ([relevant] for relevant in result.relevant), strict=True))
    return [
        f"{statistics.mean(ndcg_at(ranking, relevant) for ranking, relevant in pairs):.3f}",
        f"{statistics.mean(recall_at(ranking, relevant) for ranking, relevant in pairs):.3f}",
        f"{statistics.mean(reciprocal_rank_at(ranking, relevant) for ranking, relevant in pairs):.3f}",
        f"{statistics.mean(recall_at(ranking, relevant, len(ranking)) for ranking, relevant in pairs):.3f}",
    ]


METRICS_HEADER = ["nDCG@10", "Recall@10", "MRR@10", f"found in {RERANK_TOP_N} chunks"]


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
        rows.append([label, *metric_cells(result), f"{p50:.1f}", f"{p95:.1f}", *server])
    header = ["mode", *METRICS_HEADER, "p50 ms", "p95 ms"]
    header += [f"server {stage} ms" for stage in stages]
    return "\n".join(
        [
            f"{queries} queries over {documents} documents ({chunks} chunks), {RERANK_TOP_N} chunks a search "
            f"(hybrid+rerank: the hybrid {RERANK_TOP_N} reordered); {machine()}.",
            "",
            markdown_table(header, rows),
        ]
    )


def evaluate_stack(
    repository: Path, labelled: Sequence[Example], queries: Sequence[Example], modes: Sequence[str], work_dir: Path
) -> tuple[dict[str, Result], int]:
    """Index ``labelled`` in a stack started on ``repository`` and search ``queries`` in every mode: the results
    by mode label, and the chunks indexed."""
    models = ["embedder", "reranker"] if "hybrid+rerank" in modes else ["embedder"]
    with (
        running_stack(repository, models, work_dir / "data", work_dir, **PATIENT) as stack,
        TritonRagClient(stack.orchestrator.http_url, timeout_s=600) as client,
    ):
        client.create_collection(CollectionCreate(name=COLLECTION))
        chunks = 0
        for first in range(0, len(labelled), UPSERT_BATCH):
            batch = labelled[first : first + UPSERT_BATCH]
            documents = [DocumentIn(id=example.module, text=example.document) for example in batch]
            chunks += client.upsert(COLLECTION, documents).chunks
        progress(f"indexed {len(labelled)} documents as {chunks} chunks")
        results = {mode.label: evaluate(client, mode, queries) for mode in MODES if mode.label in modes}
    return results, chunks


def embedder_repository(
    embedder_dir: Path, work_dir: Path, reranker_from: Path | None = None, config: Path | None = None
) -> Path:
    """A repository in ``work_dir`` serving ``embedder_dir`` as version 1 of ``embedder`` (and, when given, the
    reranker of ``reranker_from``), by symbolic links; its ``config.pbtxt`` is ``config``, else the one beside
    ``embedder_dir``, else the project's template."""
    repository = work_dir / "repository"
    model_dir = repository / "embedder"
    model_dir.mkdir(parents=True)
    if config is None:
        config = embedder_dir.parent / "config.pbtxt"
        if not config.is_file():
            config = CONFIG_TEMPLATE
    shutil.copy(config, model_dir / "config.pbtxt")
    (model_dir / "1").symlink_to(embedder_dir.resolve(), target_is_directory=True)
    if reranker_from is not None:
        (repository / "reranker").symlink_to((reranker_from / "reranker").resolve(), target_is_directory=True)
    return repository


def labelled_set(documents: int | None, queries: int | None, seed: int) -> tuple[list[Example], list[Example]]:
    """The labelled documents and the queries evaluated (``None``: all)."""
    labelled = examples()
    if documents:
        labelled = sorted(random.Random(seed).sample(labelled, documents), key=lambda e: e.module)
    chosen = random.Random(seed).sample(labelled, queries) if queries else labelled
    return labelled, chosen


def compare(
    embedders: Mapping[str, Path],
    modes: Sequence[str],
    work_dir: Path,
    documents: int | None = None,
    queries: int | None = None,
    seed: int = 0,
    reranker_repository: Path | None = None,
) -> str:
    """Every embedder version directory evaluated in a stack of its own; one markdown table, side by side.

    The reranker (mode ``hybrid+rerank``) comes from ``reranker_repository`` (default: see ``stack.py``)."""
    labelled, chosen = labelled_set(documents, queries, seed)
    reranker_from = model_repository(reranker_repository, ["reranker"]) if "hybrid+rerank" in modes else None
    rows = []
    chunks = 0
    for number, (label, embedder_dir) in enumerate(embedders.items()):
        progress(f"retrieval: {label} ({embedder_dir})")
        stack_dir = work_dir / f"embedder-{number}"
        stack_dir.mkdir()
        repository = embedder_repository(embedder_dir, stack_dir, reranker_from)
        try:
            results, chunks = evaluate_stack(repository, labelled, chosen, modes, stack_dir)
        except Exception as exc:  # one stack that fails does not lose the others' results
            progress(f"retrieval: {label} failed: {type(exc).__name__}: {exc}")
            rows.append([label, "failed", f"{type(exc).__name__}: {exc}", *[""] * (len(METRICS_HEADER) + 1)])
            continue
        for mode, result in results.items():
            p50, p95 = percentiles(result.latencies_ms, [50, 95])
            rows.append([label, mode, *metric_cells(result), f"{p50:.1f}", f"{p95:.1f}"])
            progress(f"retrieval: {label}, {mode}: " + ", ".join(rows[-1][2:5]))
    return "\n".join(
        [
            f"bench/retrieval_eval.py: {len(chosen)} queries over {len(labelled)} documents ({chunks} chunks), "
            f"{RERANK_TOP_N} chunks a search; {machine()}.",
            "",
            markdown_table(["embedder", "mode", *METRICS_HEADER, "p50 ms", "p95 ms"], rows, labels=2),
        ]
    )


def run(args: argparse.Namespace, work_dir: Path) -> str:
    """Index the labelled set in a stack started here and evaluate every mode; the markdown report."""
    if args.embedder:
        labels = [str(path) for path in args.embedder]
        return compare(
            dict(zip(labels, args.embedder, strict=True)),
            args.modes,
            work_dir,
            args.documents,
            args.queries,
            args.seed,
            args.repository,
        )
    models = ["embedder", "reranker"] if "hybrid+rerank" in args.modes else ["embedder"]
    repository = model_repository(args.repository, models)
    labelled, queries = labelled_set(args.documents, args.queries, args.seed)
    progress(f"{len(labelled)} documents, {len(queries)} queries; models from {repository}")
    results, chunks = evaluate_stack(repository, labelled, queries, args.modes, work_dir)
    embedder = version_dir(repository, "embedder")
    return f"Embedder: `{embedder}`.\n\n" + report(results, len(labelled), chunks, len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--documents", type=int, help="index only this many modules, drawn at random (default: all)")
    parser.add_argument("--queries", type=int, help="evaluate only this many of them, drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument(
        "--embedder", type=Path, nargs="+", help="embedder version directories to evaluate, side by side"
    )
    labels = [mode.label for mode in MODES]
    parser.add_argument("--modes", nargs="+", choices=labels, default=labels, help="modes to evaluate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(run(args, Path(work_dir)))


if __name__ == "__main__":
    main()

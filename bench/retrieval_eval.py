"""Retrieval quality of the search endpoint on three labelled sets: nDCG@10, Recall@10 and MRR@10 per configuration.

Every set is built offline from text every machine has; each query has one relevant document:

- ``stdlib``: the documentation of Python's standard-library modules. A module's summary (the first
  sentence of its docstring) is the query, the rest of its docstring the document. Docstrings of Python
  modules are read with ``ast`` (nothing is imported); compiled modules are imported for theirs. Modules
  whose name has a private part, and those with a summary under 3 or over 40 words or a remainder under
  20 words, are left out.
- ``pydoc``: a sample (``--pydoc-documents``, seed ``--seed``) of ``bench/corpus.py``'s long documents, the
  ``help()`` pages of modules, classes and functions (a few KB to several hundred KB); a page's summary (the
  first sentence of its docstring) is the query, the page the document.
- ``modules``: every module page of that corpus is a document; the summary of a class or function of the
  corpus is a query, and its module's page, with that summary cut out (as ``stdlib`` cuts a module's), the
  relevant document. Only summaries found word for word (white space aside) in their module's page and in no
  other module page are queries, so that each names one document (in ``pydoc`` a class's summary is also in
  its module's page, which no label counts).

Every document is upserted over HTTP with its title in metadata (``title``: the module or object name) into
two collections of a fresh stack: ``plain`` (no chunk headers) and ``headers`` (the default chunk header:
the title). Each query is searched once per configuration of ``--modes`` through ``tritonrag eval``'s code
(``clients/evaluation.py``: documents ranked at their best chunk, top 10, no cache), one at a time; the
table gives the means and the median latency per query. ``hybrid`` (RRF of dense and chunk BM25 without
document evidence, on ``plain``) is the baseline of the issue's targets; ``default`` is a search with every
request default, on the ``headers`` collection. ``--documents`` and ``--queries`` draw smaller sets.

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
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corpus import docstrings, pydoc_documents, sample_documents, stdlib_dir
from stack import machine, markdown_table, model_repository, progress, running_stack, split_summary, version_dir

from tests.serving import ADMIN_KEY
from tritonrag.clients.evaluation import LabelledQuery, ModeResult, evaluate
from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.schema import (
    NO_HEADER,
    ChunkHeader,
    Chunking,
    CollectionCreate,
    DocumentIn,
    Fusion,
    FusionMethod,
    FusionWeights,
    SearchMode,
    SearchRequest,
)

CONFIG_TEMPLATE = Path(__file__).resolve().parents[1] / "model_repository" / "embedder" / "config.pbtxt"
SUMMARY_WORDS = (3, 40)
MIN_DOCUMENT_WORDS = 20
UPSERT_BATCH = 32
PYDOC_DOCUMENTS = 600
SETS = ["stdlib", "pydoc", "modules"]
# A reranking may take longer than the default 10 s a Triton call may take on a loaded machine: quality is
# measured here, so the orchestrator waits as long as it takes.
PATIENT = {"TRITONRAG_ROUTING__ATTEMPT_TIMEOUT_S": "600", "TRITONRAG_ROUTING__REQUEST_TIMEOUT_S": "600"}
HEADINGS = {"plain": NO_HEADER, "headers": ChunkHeader()}


@dataclass(frozen=True)
class Example:
    """A labelled document: its query (a summary), its text without that summary where it was cut out, its title."""

    doc_id: str
    query: str
    document: str
    title: str


@dataclass(frozen=True)
class Mode:
    """A search configuration under test: the collection (``plain`` or ``headers``) and the request's settings."""

    label: str
    collection: str
    mode: SearchMode = SearchMode.hybrid
    fusion: Fusion = field(default_factory=Fusion)
    rerank: bool = False

    def request(self, collection: str) -> SearchRequest:
        """The search as a template (``evaluate`` sets the query, ``top_k`` and grouping)."""
        return SearchRequest(collection=collection, query="-", mode=self.mode, fusion=self.fusion, rerank=self.rerank)


CHUNKS_ONLY = Fusion(document=0.0)
FIXED_WEIGHTS = Fusion(**FusionWeights().model_dump())  # the default weights for every query, verbatim ones too
MODES = (
    Mode("dense", "plain", SearchMode.dense),
    Mode("sparse, chunks only", "plain", SearchMode.sparse, CHUNKS_ONLY),
    Mode("sparse, fixed weights", "plain", SearchMode.sparse, FIXED_WEIGHTS),
    Mode("sparse", "plain", SearchMode.sparse),
    # The baseline of the targets: reciprocal rank fusion of dense and chunk BM25, as before this version.
    Mode(
        "hybrid RRF, chunks only",
        "plain",
        SearchMode.hybrid,
        Fusion(method=FusionMethod.rrf, dense=1, sparse=1, document=0),
    ),
    Mode("hybrid RRF", "plain", SearchMode.hybrid, Fusion(method=FusionMethod.rrf, dense=1, sparse=1, document=1)),
    Mode("hybrid minmax", "plain", SearchMode.hybrid, Fusion(method=FusionMethod.minmax)),
    Mode("hybrid, chunks only", "plain", SearchMode.hybrid, CHUNKS_ONLY),
    Mode("hybrid, fixed weights", "plain", SearchMode.hybrid, FIXED_WEIGHTS),
    Mode("hybrid", "plain", SearchMode.hybrid),
    Mode("dense, headers", "headers", SearchMode.dense),
    Mode("sparse, headers", "headers", SearchMode.sparse),
    Mode("default, fixed weights", "headers", SearchMode.hybrid, FIXED_WEIGHTS),
    Mode("default", "headers", SearchMode.hybrid),
    Mode("default+rerank", "headers", SearchMode.hybrid, rerank=True),
)
# The modes of earlier versions of this script, still accepted (bench/int8.py passes them).
ALIASES = {"hybrid+rerank": "default+rerank"}


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
    """The ``stdlib`` set: one example per module whose summary and remainder are long enough, by module name."""
    found: dict[str, Example] = {}
    for module, doc in module_docstrings():
        summary, rest = split_summary(doc)
        if SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1] and len(rest.split()) >= MIN_DOCUMENT_WORDS:
            found.setdefault(module, Example(module, summary, rest, module))
    return sorted(found.values(), key=lambda example: example.doc_id)


def pydoc_examples(count: int, seed: int) -> list[Example]:
    """The ``pydoc`` set: ``count`` pages drawn with ``seed``, those with a summary, by id (``kind:name``)."""
    pages = [page for page in sample_documents(pydoc_documents(), count, seed) if page.summary]
    chosen = [Example(page.id, page.summary, page.text, page.id.split(":", 1)[1]) for page in pages]
    return sorted(chosen, key=lambda example: example.doc_id)


def module_examples() -> tuple[list[Example], list[Example]]:
    """The ``modules`` set: every module page (by id) with the summaries of its queries cut out, and the class
    and function summaries that single out their module's page (by the id of the object they summarise)."""
    documents = pydoc_documents()
    pages = {page.id.split(":", 1)[1]: page for page in documents if page.kind == "module"}
    flat = {name: " ".join(page.text.split()) for name, page in pages.items()}
    queries = []
    for page in documents:
        if page.kind == "module" or not page.summary:
            continue
        parts = page.id.split(":", 1)[1].split(".")
        owner = next((m for m in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if m in pages), None)
        summary = " ".join(page.summary.split())
        if owner is not None and [name for name, text in flat.items() if summary in text] == [owner]:
            queries.append(Example(pages[owner].id, page.summary, "", page.id))
    cut: dict[str, str] = {page.id: page.text for page in pages.values()}
    for query in queries:  # the summary as the page wraps it: its words, any white space between them
        pattern = r"\s+".join(re.escape(word) for word in query.query.split())
        cut[query.doc_id] = re.sub(pattern, "", cut[query.doc_id])
    labelled = [Example(page.id, "", cut[page.id], name) for name, page in sorted(pages.items())]
    return labelled, sorted(queries, key=lambda example: example.title)


def document_ranking(doc_ids: Sequence[str]) -> list[str]:
    """The distinct documents of the hits, in hit order (a document ranks at its best chunk)."""
    return list(dict.fromkeys(doc_ids))


def selected(labels: Sequence[str]) -> list[Mode]:
    """The modes named by ``labels`` (or their former names), in table order."""
    wanted = {ALIASES.get(label, label) for label in labels}
    return [mode for mode in MODES if mode.label in wanted]


def evaluate_stack(
    repository: Path, labelled: Sequence[Example], queries: Sequence[Example], modes: Sequence[Mode], work_dir: Path
) -> tuple[dict[str, ModeResult], dict[str, int]]:
    """Index ``labelled`` in a stack started on ``repository`` (one collection per heading the modes use) and
    search ``queries`` in every mode: the results by mode label, and the chunks of each collection."""
    models = ["embedder", "reranker"] if any(mode.rerank for mode in modes) else ["embedder"]
    headings = sorted({mode.collection for mode in modes})
    with (
        running_stack(repository, models, work_dir / "data", work_dir, **PATIENT) as stack,
        TritonRagClient(stack.orchestrator.http_url, timeout_s=600, api_key=ADMIN_KEY) as client,
    ):
        chunks: dict[str, int] = {}
        for heading in headings:
            client.create_collection(CollectionCreate(name=heading, chunking=Chunking(header=HEADINGS[heading])))
            for first in range(0, len(labelled), UPSERT_BATCH):
                batch = labelled[first : first + UPSERT_BATCH]
                documents = [DocumentIn(id=e.doc_id, text=e.document, metadata={"title": e.title}) for e in batch]
                job_id = client.upsert(heading, documents).job_id
                job = client.wait_for_job(job_id) if job_id else None  # a batch of long documents runs as a job
                if job is not None and job.failed:
                    raise RuntimeError(f"{heading}: {job.failed} documents failed: {job.errors[:3]}")
            chunks[heading] = client.get_collection(heading).chunks
            progress(f"{heading}: indexed {len(labelled)} documents as {chunks[heading]} chunks")
        labelled_queries = [LabelledQuery(query=e.query, relevant=[e.doc_id]) for e in queries]
        results = {}
        for mode in modes:
            results[mode.label] = evaluate(client, mode.request(mode.collection), labelled_queries, mode.label)
            progress(f"{mode.label}: nDCG@10 {results[mode.label].ndcg:.3f}")
    return results, chunks


def chunk_counts(chunks: Mapping[str, int]) -> str:
    """``plain: N chunks, headers: M chunks``."""
    return ", ".join(f"{heading}: {count} chunks" for heading, count in chunks.items())


def result_cells(result: ModeResult) -> list[str]:
    return [f"{result.ndcg:.3f}", f"{result.recall:.3f}", f"{result.mrr:.3f}", f"{result.p50_ms:.1f}"]


METRICS_HEADER = ["nDCG@10", "Recall@10", "MRR@10", "p50 ms"]


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


def labelled_set(
    name: str, documents: int | None, queries: int | None, seed: int, pydoc_documents_count: int = PYDOC_DOCUMENTS
) -> tuple[list[Example], list[Example]]:
    """The documents of set ``name`` (``documents`` of them drawn, ``None``: all) and the queries evaluated
    (``queries`` of those whose document is indexed, ``None``: all)."""
    if name == "modules":
        labelled, candidates = module_examples()
    else:
        labelled = examples() if name == "stdlib" else pydoc_examples(pydoc_documents_count, seed)
        candidates = labelled
    if documents:
        labelled = sorted(random.Random(seed).sample(labelled, documents), key=lambda e: e.doc_id)
    indexed = {example.doc_id for example in labelled}
    candidates = [example for example in candidates if example.doc_id in indexed]
    chosen = random.Random(seed).sample(candidates, queries) if queries else candidates
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
    """Every embedder version directory evaluated on the ``stdlib`` set in a stack of its own; one markdown
    table, side by side. The reranker (modes with ``rerank``) comes from ``reranker_repository`` (default: see
    ``stack.py``)."""
    chosen_modes = selected(modes)
    labelled, chosen = labelled_set("stdlib", documents, queries, seed)
    rerank = any(mode.rerank for mode in chosen_modes)
    reranker_from = model_repository(reranker_repository, ["reranker"]) if rerank else None
    rows = []
    chunks: dict[str, int] = {}
    for number, (label, embedder_dir) in enumerate(embedders.items()):
        progress(f"retrieval: {label} ({embedder_dir})")
        stack_dir = work_dir / f"embedder-{number}"
        stack_dir.mkdir()
        repository = embedder_repository(embedder_dir, stack_dir, reranker_from)
        try:
            results, chunks = evaluate_stack(repository, labelled, chosen, chosen_modes, stack_dir)
        except Exception as exc:  # one stack that fails does not lose the others' results
            progress(f"retrieval: {label} failed: {type(exc).__name__}: {exc}")
            rows.append([label, "failed", f"{type(exc).__name__}: {exc}", *[""] * (len(METRICS_HEADER) - 1)])
            continue
        rows += [[label, mode, *result_cells(result)] for mode, result in results.items()]
    return "\n".join(
        [
            f"bench/retrieval_eval.py: {len(chosen)} queries over {len(labelled)} documents ({chunk_counts(chunks)}); "
            f"{machine()}.",
            "",
            markdown_table(["embedder", "mode", *METRICS_HEADER], rows, labels=2),
        ]
    )


def run(args: argparse.Namespace, work_dir: Path) -> str:
    """Index each labelled set in a stack started here and evaluate every mode; the markdown report."""
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
    modes = selected(args.modes)
    models = ["embedder", "reranker"] if any(mode.rerank for mode in modes) else ["embedder"]
    repository = model_repository(args.repository, models)
    rows, notes = [], []
    for name in args.sets:
        labelled, queries = labelled_set(name, args.documents, args.queries, args.seed, args.pydoc_documents)
        progress(f"{name}: {len(labelled)} documents, {len(queries)} queries; models from {repository}")
        set_dir = work_dir / name
        set_dir.mkdir()
        results, chunks = evaluate_stack(repository, labelled, queries, modes, set_dir)
        notes.append(
            f"`{name}`: {len(queries)} queries over {len(labelled)} documents ({chunks} chunks without headers)"
        )
        rows += [[name, mode, *result_cells(result)] for mode, result in results.items()]
    embedder = version_dir(repository, "embedder")
    return "\n".join(
        [
            f"Embedder: `{embedder}`; {'; '.join(notes)}; {machine()}.",
            "",
            markdown_table(["set", "mode", *METRICS_HEADER], rows, labels=2),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=SETS)
    parser.add_argument("--pydoc-documents", type=int, default=PYDOC_DOCUMENTS, help="pages drawn for the pydoc set")
    parser.add_argument("--documents", type=int, help="index only this many of a set, drawn at random (default: all)")
    parser.add_argument("--queries", type=int, help="evaluate only this many of them, drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument(
        "--embedder", type=Path, nargs="+", help="embedder version directories to evaluate, side by side"
    )
    labels = [mode.label for mode in MODES]
    parser.add_argument(
        "--modes", nargs="+", choices=[*labels, *ALIASES], default=labels, help="configurations to evaluate"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(run(args, Path(work_dir)))


if __name__ == "__main__":
    main()

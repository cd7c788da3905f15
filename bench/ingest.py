"""Ingestion throughput: the pydoc corpus at real scale (default), or the earlier short passages.

``--corpus pydoc`` (default). ``--documents`` long documents of ``bench/corpus.py``'s pydoc corpus
(``all``: the whole corpus, the full run; default: a smoke-sized sample), drawn with ``--seed``.
For each embedder of ``--embedders`` (``fp32``: the benchmark repository's, see ``stack.py``;
``int8``: that float32 graph with every MatMul quantised, ``--quantize int8``'s first choice, built by
``bench/int8.py``'s ``int8_version`` into ``.cache/``, or the embedder of ``--int8-repository``), side by
side in one run:

* the in-process baseline (``bench/ortloop.py``): the same chunk texts (cut here by the server's own
  chunker, default chunking) embedded with the same version directory's ``model.onnx`` and
  ``tokenizer.json``, length-sorted into batches of at most ``--loop-max-tokens`` padded tokens (given
  several, each is measured and the fastest is the baseline), ONNX Runtime on every core; measured
  before the stack starts;
* end to end through a real stack (``stack.running_stack``: Triton and the orchestrator, default
  settings; each version served as it is, by a link, with the same ``--config``, by default the
  project's ``model_repository/embedder/config.pbtxt``): a fresh collection, upserts of
  ``--request-documents`` documents (fewer when the body would pass ``--max-request-mb``) over HTTP;
  upserts of more than 64 documents run as jobs, of which ``--pending-jobs`` are kept submitted
  ahead; the rate is the collection's chunks over the time from the first request to the last job's
  end; the collection's chunk count is checked against the local one;
* while it ingests: a steady open-loop stream of ``POST /v1/search`` (hybrid, ``top_k`` 10) at
  ``--search-rate`` a second, queries cycling through the documents' one-sentence summaries, against
  the collection being filled; then the same stream for ``--idle-seconds`` on the idle stack (the
  full collection): latency p50/p95 and the errors (an exception or a status other than 200);
* CPU: every core's busy share over each measured window, from ``/proc/stat`` (user + nice + system
  + irq + softirq + steal over all but idle and iowait), and the CPU ms per chunk of the orchestrator,
  Triton (with its backend stubs) and this process.

* unless ``--no-quality``: known-item retrieval over the first round's full collection, dense, sparse and
  hybrid: each document's summary is a query whose one relevant document is that document (ranked at its
  best chunk); nDCG@10, Recall@10, MRR@10; the int8 embedder holds when it loses at most 0.01 nDCG@10.

Targets: stack >= 0.95x the loop (fp32); int8 stack >= 1.6x fp32 stack. The report is markdown on
stdout (progress on stderr); benchmarks assert nothing about time.

``--corpus passages``: the earlier benchmark. ``--documents`` real passages of varying lengths
(sentences, paragraphs and sections of the standard library's docstrings, in the shares of
``PASSAGE_SHARES``) are ingested over HTTP, in inline upserts of ``--batch`` documents from
``--concurrency`` clients, into a fresh collection (default chunking); the rate is chunks
acknowledged per second. The baseline, in the same run, sends the same chunk texts (cut in this
process by the server's own chunker) straight to the served embedder with ``tritonclient.grpc.aio``,
``--batch`` texts a request from ``--concurrency`` clients. Each round runs the baseline, then the
ingestion into a collection of its own; the report lists every round, the CPU time per chunk of each
process, and the median ratio against the 0.7x target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import tritonclient.grpc.aio as grpcclient
from corpus import Document, build_corpus, corpus_digest, describe_distribution, pydoc_documents, sample_documents
from embed import percentiles, tree_cpu_seconds
from int8 import int8_version
from ortloop import DEFAULT_MAX_TOKENS, OrtLoop
from retrieval_eval import CONFIG_TEMPLATE, document_ranking, embedder_repository
from stack import (
    Run,
    Stack,
    batched,
    closed_loop,
    machine,
    markdown_table,
    model_repository,
    post_json,
    progress,
    running_stack,
    version_dir,
)

from tests.serving import ADMIN_HEADERS
from tritonrag.clients.evaluation import ndcg_at, recall_at, reciprocal_rank_at
from tritonrag.clients.wire.schema import Chunking, DocumentIn
from tritonrag.server.ingest.chunking import Chunker
from tritonrag.server.store.documents import with_header

PASSAGE_SHARES = {"sentence": 0.73, "paragraph": 0.23, "section": 0.04}
PASSAGES_TARGET = 0.7
LOOP_TARGET = 0.95  # stack / in-process loop, same embedder
INT8_TARGET = 1.6  # int8 stack / fp32 stack
INT8_QUALITY_MARGIN = 0.01  # int8 may lose at most this much nDCG@10 against fp32
INLINE_MAX = 64  # the server's default ingest.inline_max_documents: larger upserts become jobs
SMOKE_DOCUMENTS = 100
POLL_S = 0.1
LOOP, STACK = "in-process ORT loop", "stack ingest (HTTP)"


# The pydoc corpus at scale.


def cpu_times() -> dict[str, tuple[int, int]]:
    """Every core's ``(busy, total)`` jiffies from ``/proc/stat`` (idle and iowait are not busy)."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                # user nice system idle iowait irq softirq steal (guest time is already counted in user)
                values = [int(v) for v in fields[:8]]
                total = sum(values)
                times[name] = (total - values[3] - values[4], total)
    return times


def busy_shares(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[float]:
    """Each core's busy share between two ``cpu_times`` readings, in core order."""
    shares = []
    for name in sorted(before, key=lambda n: int(n[3:])):
        busy, total = after[name][0] - before[name][0], after[name][1] - before[name][1]
        shares.append(busy / total if total else 0.0)
    return shares


@dataclass
class SearchLog:
    """What a search stream saw: latencies of the answered searches, errors, degraded answers."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    degraded: int = 0

    @property
    def sent(self) -> int:
        return len(self.latencies_ms) + len(self.errors)


async def one_search(http: httpx2.AsyncClient, collection: str, query: str, log: SearchLog) -> None:
    """A hybrid search; its latency, or its error, into ``log``."""
    body = {"collection": collection, "query": query, "mode": "hybrid", "top_k": 10}
    began = time.perf_counter()
    try:
        response = await http.post("/v1/search", json=body)
    except Exception as exc:
        log.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if response.status_code != 200:
        log.errors.append(f"{response.status_code} {response.text[:200]}")
        return
    log.latencies_ms.append((time.perf_counter() - began) * 1e3)
    log.degraded += bool(response.json().get("degraded"))


async def search_stream(
    http: httpx2.AsyncClient, collection: str, queries: Sequence[str], rate: float, stop: asyncio.Event
) -> SearchLog:
    """Searches sent at ``rate`` a second (open loop: not waiting for answers) until ``stop``; all answered."""
    log = SearchLog()
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    while not stop.is_set():
        delay = start + len(tasks) / rate - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        query = queries[len(tasks) % len(queries)]
        tasks.append(asyncio.create_task(one_search(http, collection, query, log)))
    await asyncio.gather(*tasks)
    return log


async def timed_stream(
    http: httpx2.AsyncClient, collection: str, queries: Sequence[str], rate: float, seconds: float
) -> SearchLog:
    """A search stream for ``seconds``."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await search_stream(http, collection, queries, rate, stop)


def upsert_requests(documents: Sequence[Document], max_documents: int, max_bytes: int) -> list[list[dict[str, str]]]:
    """Request bodies' documents: ``max_documents`` each, fewer where the JSON would pass ``max_bytes``."""
    requests: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    size = 0
    for document in documents:
        row = {"id": document.id, "text": document.text}
        row_bytes = len(json.dumps(row)) + 2
        if current and (len(current) >= max_documents or size + row_bytes > max_bytes):
            requests.append(current)
            current, size = [], 0
        current.append(row)
        size += row_bytes
    if current:
        requests.append(current)
    return requests


async def ingest_all(
    http: httpx2.AsyncClient, collection: str, requests: Sequence[list[dict[str, str]]], pending_jobs: int
) -> None:
    """Upsert every request in order, keeping at most ``pending_jobs`` jobs unfinished; return once all are done."""
    unfinished: list[str] = []

    async def settle(wait_for: int) -> None:
        while len(unfinished) > wait_for:
            for job_id in list(unfinished):
                response = await http.get(f"/v1/jobs/{job_id}")
                if response.status_code != 200:
                    raise RuntimeError(f"GET /v1/jobs/{job_id}: {response.status_code} {response.text[:500]}")
                job = response.json()
                if job["status"] == "failed" or job["failed"]:
                    raise RuntimeError(f"job {job_id} failed: {job['failed']} documents; {job['errors'][:3]}")
                if job["status"] == "succeeded":
                    unfinished.remove(job_id)
            if len(unfinished) > wait_for:
                await asyncio.sleep(POLL_S)

    for documents in requests:
        await settle(pending_jobs - 1)
        response = await http.post(f"/v1/collections/{collection}/documents", json={"documents": documents})
        if response.status_code == 202:
            unfinished.append(response.json()["job_id"])
        elif response.status_code not in (200, 201):
            raise RuntimeError(f"upsert into {collection}: {response.status_code} {response.text[:500]}")
    await settle(0)


@dataclass(frozen=True)
class KnownItem:
    """Known-item retrieval over the ingested collection: each document's summary is a query whose one
    relevant document is that document (a document ranks at its best chunk)."""

    queries: int
    ndcg_at_10: float
    recall_at_10: float
    mrr_at_10: float


async def known_item(http: httpx2.AsyncClient, collection: str, documents: Sequence[Document], mode: str) -> KnownItem:
    """nDCG@10, Recall@10 and MRR@10 of ``mode`` searches for every document's summary, one at a time."""
    gains, found, reciprocal = [], 0.0, []
    asked = [document for document in documents if document.summary]
    for document in asked:
        body = {"collection": collection, "query": document.summary, "mode": mode, "top_k": 50}
        hits = (await post_json(http, "/v1/search", body))["hits"]
        ranking = document_ranking([hit["doc_id"] for hit in hits])
        gains.append(ndcg_at(ranking, [document.id]))
        reciprocal.append(reciprocal_rank_at(ranking, [document.id]))
        found += recall_at(ranking, [document.id])
    count = max(1, len(asked))
    return KnownItem(len(asked), sum(gains) / count, found / count, sum(reciprocal) / count)


@dataclass(frozen=True)
class Window:
    """One measured window: chunks done, wall seconds, core busy shares and CPU ms per chunk by process."""

    embedder: str
    run: str
    round: int
    chunks: int
    seconds: float
    busy: list[float]
    cpu_ms: dict[str, float]
    search: SearchLog | None = None
    idle_search: SearchLog | None = None
    note: str = ""
    setting: str = ""
    quality: dict[str, KnownItem] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds


class CpuWindow:
    """Core busy shares and the CPU seconds of some processes (and this one) between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.cores = cpu_times()
        self.processes = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.own = time.process_time()
        self.began = time.perf_counter()

    def stop(self, chunks: int) -> tuple[float, list[float], dict[str, float]]:
        """Wall seconds, busy shares by core, and CPU ms per chunk by process (``this process`` included)."""
        seconds = time.perf_counter() - self.began
        busy = busy_shares(self.cores, cpu_times())
        cpu_ms = {
            name: (tree_cpu_seconds(pid) - self.processes[name]) * 1e3 / chunks for name, pid in self.pids.items()
        }
        cpu_ms["this process"] = (time.process_time() - self.own) * 1e3 / chunks
        return seconds, busy, cpu_ms


def measure_loop(
    embedder: str, loop: OrtLoop, texts: Sequence[str], rounds: int, budgets: Sequence[int]
) -> list[Window]:
    """The in-process loop over ``texts``, ``rounds`` times, at every token budget of ``budgets`` in each round."""
    loop.run(texts[:64])  # warm-up: session and thread pool
    windows = []
    for round_number in range(1, rounds + 1):
        for budget in budgets:
            loop.max_tokens = budget
            window = CpuWindow({})
            window.start()
            run = loop.run(texts)
            _, busy, cpu_ms = window.stop(len(texts))
            note = f"{run.batches} batches, {run.padded_tokens / run.tokens - 1:.1%} padding"
            setting = f"<= {budget} tokens a batch"
            windows.append(
                Window(embedder, LOOP, round_number, len(texts), run.seconds, busy, cpu_ms, note=note, setting=setting)
            )
            progress(f"{embedder}: loop round {round_number}, {setting}: {run.rate:.1f} chunks/s")
    return windows


async def measure_stack(
    args: argparse.Namespace,
    embedder: str,
    version: Path,
    documents: Sequence[Document],
    chunks: int,
    queries: Sequence[str],
    work_dir: Path,
) -> list[Window]:
    """Ingest rounds into fresh collections of one stack, with a search stream during each and after it."""
    requests = upsert_requests(documents, args.request_documents, int(args.max_request_mb * 1e6))
    windows = []
    stack_dir = work_dir / embedder
    stack_dir.mkdir()
    # The version served as it is, with the same config.pbtxt for every embedder.
    served = embedder_repository(version, stack_dir, config=args.config)
    with running_stack(served, ["embedder"], stack_dir / "data", stack_dir) as stack:
        assert stack.triton.pid is not None
        pids = {"orchestrator": stack.orchestrator.process.pid, "Triton": stack.triton.pid}
        async with (
            httpx2.AsyncClient(base_url=stack.orchestrator.http_url, timeout=600, headers=ADMIN_HEADERS) as http,
            httpx2.AsyncClient(base_url=stack.orchestrator.http_url, timeout=120, headers=ADMIN_HEADERS) as searches,
        ):
            await post_json(http, "/v1/collections", {"name": "warm-up"})
            await ingest_all(http, "warm-up", upsert_requests(documents[:8], 8, 10**7), 1)
            await timed_stream(searches, "warm-up", queries, args.search_rate, 2.0)
            for round_number in range(1, args.rounds + 1):
                collection = f"ingest-{round_number}"
                await post_json(http, "/v1/collections", {"name": collection})
                stop = asyncio.Event()
                stream = asyncio.create_task(search_stream(searches, collection, queries, args.search_rate, stop))
                window = CpuWindow(pids)
                window.start()
                await ingest_all(http, collection, requests, args.pending_jobs)
                seconds, busy, cpu_ms = window.stop(chunks)
                stop.set()
                during = await stream
                info = (await http.get(f"/v1/collections/{collection}")).json()
                note = "" if info["chunks"] == chunks else f"MISMATCH: the server has {info['chunks']} chunks"
                progress(f"{embedder}: ingest round {round_number}: {chunks / seconds:.1f} chunks/s {note}")
                idle = await timed_stream(searches, collection, queries, args.search_rate, args.idle_seconds)
                quality = {}
                if round_number == 1 and args.quality:
                    for mode in ("dense", "sparse", "hybrid"):
                        quality[mode] = await known_item(searches, collection, documents, mode)
                        progress(f"{embedder}: known-item {mode}: nDCG@10 {quality[mode].ndcg_at_10:.3f}")
                windows.append(
                    Window(
                        embedder,
                        STACK,
                        round_number,
                        chunks,
                        seconds,
                        busy,
                        cpu_ms,
                        during,
                        idle,
                        note,
                        "default",
                        quality,
                    )
                )
    return windows


def best_rate(windows: Sequence[Window], embedder: str, run: str) -> tuple[float, str] | None:
    """The highest of the median rates of ``run``'s settings for ``embedder``, and that setting."""
    settings = {w.setting for w in windows if w.embedder == embedder and w.run == run}
    medians = [
        (statistics.median(w.rate for w in windows if (w.embedder, w.run, w.setting) == (embedder, run, s)), s)
        for s in settings
    ]
    return max(medians) if medians else None


def verdict(ratio: float, target: float) -> str:
    return "pass" if ratio >= target else f"miss by {1 - ratio / target:.0%}"


def search_cells(log: SearchLog) -> list[str]:
    if not log.latencies_ms:
        return [str(log.sent), str(len(log.errors)), str(log.degraded), "-", "-", "-"]
    p50, p95, top = percentiles(log.latencies_ms, [50, 95, 100])
    return [str(log.sent), str(len(log.errors)), str(log.degraded), f"{p50:.1f}", f"{p95:.1f}", f"{top:.1f}"]


def pydoc_report(args: argparse.Namespace, header: str, windows: Sequence[Window]) -> str:
    """Throughput, search latency and the ratios against the targets, as markdown."""
    processes = ["orchestrator", "Triton", "this process"]
    rows = [
        [
            w.embedder,
            w.run,
            w.setting,
            str(w.round),
            f"{w.chunks:,}",
            f"{w.seconds:.1f}",
            f"{w.rate:.1f}",
            " / ".join(f"{share:.0%}" for share in w.busy),
            *(f"{w.cpu_ms[name]:.2f}" if name in w.cpu_ms else "-" for name in processes),
            w.note,
        ]
        for w in windows
    ]
    table = ["embedder", "run", "setting", "round", "chunks", "wall s", "chunks/s", "busy per core (/proc/stat)"]
    table += [f"CPU ms/chunk: {name}" for name in processes] + ["note"]
    search_rows = []
    for w in windows:
        if w.search is not None and w.idle_search is not None:
            search_rows.append([w.embedder, str(w.round), "during ingest", *search_cells(w.search)])
            search_rows.append(
                [w.embedder, str(w.round), f"idle ({args.idle_seconds:g} s after)", *search_cells(w.idle_search)]
            )
    search_header = ["embedder", "round", "when", "searches", "errors", "degraded", "p50 ms", "p95 ms", "max ms"]
    errors = [e for w in windows for log in (w.search, w.idle_search) if log is not None for e in log.errors]
    lines = [
        header,
        "",
        markdown_table(table, rows, labels=3),
        "",
        markdown_table(search_header, search_rows, labels=3),
        "",
        *(["Search errors (the first 3): " + "; ".join(errors[:3]), ""] if errors else []),
    ]
    best = {(e, r): best_rate(windows, e, r) for e in args.embedders for r in (LOOP, STACK)}
    rates = {key: found[0] for key, found in best.items() if found}
    ratios = []
    for embedder in args.embedders:
        s, o = rates.get((embedder, STACK)), rates.get((embedder, LOOP))
        if s and o:
            setting = best[(embedder, LOOP)][1]  # type: ignore[index]
            target = f"target >= {LOOP_TARGET}x: {verdict(s / o, LOOP_TARGET)}" if embedder == "fp32" else "no target"
            ratios.append(
                f"- {embedder}: stack / in-process loop ({setting}) = {s:.1f} / {o:.1f} = **{s / o:.2f}x** ({target})"
            )
    s32, s8 = rates.get(("fp32", STACK)), rates.get(("int8", STACK))
    o32, o8 = rates.get(("fp32", LOOP)), rates.get(("int8", LOOP))
    if s32 and s8:
        ratios.append(
            f"- int8 / fp32, stack: {s8:.1f} / {s32:.1f} = **{s8 / s32:.2f}x** "
            f"(target >= {INT8_TARGET}x: {verdict(s8 / s32, INT8_TARGET)})"
        )
    if o32 and o8:
        ratios.append(f"- int8 / fp32, in-process loop: {o8:.1f} / {o32:.1f} = {o8 / o32:.2f}x (no target)")
    quality_rows = [
        [w.embedder, mode, str(q.queries), f"{q.ndcg_at_10:.3f}", f"{q.recall_at_10:.3f}", f"{q.mrr_at_10:.3f}"]
        for w in windows
        for mode, q in w.quality.items()
    ]
    if quality_rows:
        lines += [
            "Known-item retrieval over the ingested collection (each document's summary a query, its document the "
            "one relevant; a document ranks at its best chunk; top_k 50 chunks):",
            "",
            markdown_table(["embedder", "mode", "queries", "nDCG@10", "Recall@10", "MRR@10"], quality_rows, labels=2),
            "",
        ]
        scores = {(w.embedder, mode): q.ndcg_at_10 for w in windows for mode, q in w.quality.items()}
        for mode in ("dense", "hybrid"):
            if ("fp32", mode) in scores and ("int8", mode) in scores:
                delta = scores[("int8", mode)] - scores[("fp32", mode)]
                holds = "holds" if delta >= -INT8_QUALITY_MARGIN else "does not hold"
                ratios.append(f"- int8 - fp32, {mode} nDCG@10: {delta:+.3f} (within {INT8_QUALITY_MARGIN}: {holds})")
    rounds = f"medians of {args.rounds} rounds" if args.rounds > 1 else "one round"
    loop_note = "; the loop's fastest setting is the baseline" if len(args.loop_max_tokens) > 1 else ""
    return "\n".join([*lines, f"Ratios of chunks/s ({rounds}{loop_note}):", "", *ratios])


async def pydoc_benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """The in-process loop and the stack for every embedder, one after the other; the markdown report."""
    corpus = pydoc_documents()
    documents = sample_documents(corpus, None if args.documents == "all" else int(args.documents), args.seed)
    queries = [document.summary for document in documents if document.summary] or ["standard library module"]
    versions = {"fp32": version_dir(model_repository(args.repository, ["embedder"]), "embedder")}
    if "int8" in args.embedders:
        versions["int8"] = int8_version(versions["fp32"], args.int8_repository)
    chunking = Chunking()
    windows: list[Window] = []
    texts: list[str] = []
    counts: list[int] = []
    for embedder in args.embedders:
        version = versions[embedder]
        chunker = Chunker.from_version_dir(version, chunking.chunk_tokens, chunking.overlap_tokens)
        # What the server embeds: each chunk after its document's header (default chunking: the first line).
        cuts = [chunker.chunk_document(DocumentIn(id=d.id, text=d.text), chunking.header) for d in documents]
        counts = [len(cut.spans) for cut in cuts]
        texts = [with_header(cut.header, span.text) for cut in cuts for span in cut.spans]
        progress(f"{embedder}: {len(documents)} documents, {len(texts)} chunks; {version}")
        loop = OrtLoop(version, spinning=args.loop_spinning == "on")
        windows += measure_loop(embedder, loop, texts, args.rounds, args.loop_max_tokens)
        del loop
        windows += await measure_stack(args, embedder, version, documents, len(texts), queries, work_dir)
    chars = [len(document.text) for document in documents]
    served = ", ".join(f"{e}: `{versions[e]}`" for e in args.embedders)
    header = "\n".join(
        [
            f"{time.strftime('%Y-%m-%d %H:%M')}; {machine()}.",
            f"{len(documents):,} of the {len(corpus):,} pydoc-corpus documents (seed {args.seed}, corpus digest "
            f"{corpus_digest(corpus)}): {sum(chars) / 1e6:.1f} MB, characters per document (median / p90 / max) "
            f"{describe_distribution(chars)}, chunks per document {describe_distribution(counts)}; "
            f"{len(texts):,} chunks of {chunking.chunk_tokens} tokens ({chunking.overlap_tokens} overlap).",
            f"Embedders: {served}; served with `{args.config}`.",
            f"Stack: default settings; upserts of <= {args.request_documents} documents "
            f"(<= {args.max_request_mb:g} MB), {args.pending_jobs} job(s) submitted ahead. In-process loop: ONNX "
            f"Runtime with {os.cpu_count()} threads (spinning {args.loop_spinning}), batches of <= "
            f"{' or '.join(map(str, args.loop_max_tokens))} padded tokens. Searches: hybrid, top_k 10, "
            f"{args.search_rate:g}/s open loop, "
            f"{len(queries)} distinct queries. Busy per core: from /proc/stat "
            f"over the window.",
        ]
    )
    return pydoc_report(args, header, windows)


# The earlier benchmark: short passages, inline upserts against the served embedder alone.


@dataclass(frozen=True)
class Row:
    """One measured pass: chunks (or texts) per second, request latency and CPU ms per chunk by process."""

    round: int
    label: str
    rate: float
    p50_ms: float
    p95_ms: float
    cpu_ms: dict[str, float]


async def measured(
    stack: Stack, round_number: int, label: str, chunks: int, loop: Callable[[], Awaitable[Run[int]]]
) -> Row:
    """Run ``loop`` and turn its run into a row, with the CPU time every process spent meanwhile."""
    assert stack.triton.pid is not None
    pids = {"orchestrator": stack.orchestrator.process.pid, "Triton": stack.triton.pid}
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    run = await loop()
    cpu_ms = {name: (tree_cpu_seconds(pid) - before[name]) * 1e3 / chunks for name, pid in pids.items()}
    cpu_ms["client"] = (time.process_time() - client_before) * 1e3 / chunks
    if sum(run.results) != chunks:
        raise RuntimeError(f"{label}: {sum(run.results)} chunks written or embedded, expected {chunks}")
    p50, p95 = percentiles(run.latencies_ms, [50, 95])
    progress(f"round {round_number}: {label}: {chunks / run.seconds:.1f}/s")
    return Row(round_number, label, chunks / run.seconds, p50, p95, cpu_ms)


async def embed_all(grpc_url: str, texts: Sequence[str], batch: int, concurrency: int) -> Run[int]:
    """Every text through the served embedder, ``batch`` a request; the result of a request is its row count."""
    from tests.serving import text_input

    client = grpcclient.InferenceServerClient(grpc_url)

    async def send(rows: Sequence[str]) -> int:
        result = await client.infer("embedder", [text_input("TEXT", rows)])
        return len(result.as_numpy("EMBEDDING"))

    try:
        return await closed_loop(batched(texts, batch), concurrency, send)
    finally:
        await client.close()


async def upsert_all(
    http_url: str, collection: str, documents: Sequence[dict[str, Any]], batch: int, concurrency: int
) -> Run[int]:
    """Create ``collection`` and upsert every document into it, ``batch`` a request; each result is a chunk count."""
    limits = httpx2.Limits(max_connections=concurrency)
    async with httpx2.AsyncClient(base_url=http_url, timeout=600, limits=limits, headers=ADMIN_HEADERS) as http:

        async def send(rows: Sequence[dict[str, Any]]) -> int:
            answer = await post_json(http, f"/v1/collections/{collection}/documents", {"documents": rows})
            return int(answer["chunks"])

        await post_json(http, "/v1/collections", {"name": collection})
        return await closed_loop(batched(documents, batch), concurrency, send)


def passages_report(args: argparse.Namespace, rows: Sequence[Row], chunks: int, kinds: dict[str, int]) -> str:
    """Every round, then the median ingestion / embedder ratio against the target."""
    processes = ["orchestrator", "Triton", "client"]
    table = [
        [
            str(row.round),
            row.label,
            f"{row.rate:.1f}",
            f"{row.p50_ms:.0f}",
            f"{row.p95_ms:.0f}",
            *(f"{row.cpu_ms[name]:.2f}" for name in processes),
        ]
        for row in rows
    ]
    header = ["round", "run", "chunks/s", "request p50 ms", "request p95 ms"]
    header += [f"CPU ms/chunk: {name}" for name in processes]
    ratios = [i.rate / e.rate for e, i in zip(rows[::2], rows[1::2], strict=True)]
    ratio = statistics.median(ratios)
    verdict = "pass" if ratio >= PASSAGES_TARGET else f"miss by {1 - ratio / PASSAGES_TARGET:.0%}"
    return "\n".join(
        [
            f"{args.documents} documents ({', '.join(f'{n} {kind}s' for kind, n in kinds.items())}; seed {args.seed}) "
            f"= {chunks} chunks of the default chunking; {args.batch} documents (ingestion) or chunk texts "
            f"(embedder alone) a request, {args.concurrency} concurrent clients; {machine()}.",
            "",
            markdown_table(header, table, labels=2),
            "",
            f"Ingestion / embedder alone: {ratio:.2f}x, the median of {len(ratios)} round(s) "
            f"({', '.join(f'{r:.2f}' for r in ratios)}); target >= {PASSAGES_TARGET}x: {verdict}.",
        ]
    )


async def passages_benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """Rounds of the baseline and the ingestion against one stack started here; the markdown report."""
    repository = model_repository(args.repository, ["embedder"])
    corpus = build_corpus(args.documents, args.seed, PASSAGE_SHARES)
    documents = [{"id": f"doc-{n}", "text": passage.text} for n, passage in enumerate(corpus)]
    chunking = Chunking()
    chunker = Chunker.from_version_dir(
        version_dir(repository, "embedder"), chunking.chunk_tokens, chunking.overlap_tokens
    )
    texts = [span.text for passage in corpus for span in chunker.chunk(passage.text)]
    kinds = {kind: sum(p.kind == kind for p in corpus) for kind in PASSAGE_SHARES}
    progress(f"{len(documents)} documents, {len(texts)} chunks; models from {repository}")
    with running_stack(repository, ["embedder"], work_dir / "data", work_dir) as stack:
        http_url, grpc_url = stack.orchestrator.http_url, stack.triton.endpoints.grpc_url
        await embed_all(grpc_url, texts[: args.batch], args.batch, 1)  # warm-up: one request each
        await upsert_all(http_url, "warm-up", documents[: args.batch], args.batch, 1)
        rows = []  # per round: the baseline, then the ingestion
        embed = partial(embed_all, grpc_url, texts, args.batch, args.concurrency)
        for round_number in range(1, args.rounds + 1):
            ingest = partial(upsert_all, http_url, f"ingest-{round_number}", documents, args.batch, args.concurrency)
            rows.append(await measured(stack, round_number, "embedder alone", len(texts), embed))
            rows.append(await measured(stack, round_number, "ingestion", len(texts), ingest))
    return passages_report(args, rows, len(texts), kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=["pydoc", "passages"], default="pydoc", help="what to ingest")
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument(
        "--documents",
        help=f"documents to ingest; 'all' (pydoc: the full run) (default: pydoc {SMOKE_DOCUMENTS}, passages 10000)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default: pydoc 1, passages 3)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling seed")
    pydoc = parser.add_argument_group("--corpus pydoc")
    pydoc.add_argument("--embedders", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    pydoc.add_argument("--int8-repository", type=Path, help="a repository exported with --quantize int8")
    pydoc.add_argument(
        "--config", type=Path, default=CONFIG_TEMPLATE, help="the embedder's config.pbtxt (default: the project's)"
    )
    pydoc.add_argument("--request-documents", type=int, default=256, help="documents an upsert request")
    pydoc.add_argument("--max-request-mb", type=float, default=8.0, help="JSON megabytes an upsert request")
    pydoc.add_argument("--pending-jobs", type=int, default=2, help="jobs submitted ahead of the running one's end")
    pydoc.add_argument("--search-rate", type=float, default=4.0, help="searches a second, during and after ingest")
    pydoc.add_argument("--idle-seconds", type=float, default=20.0, help="length of the idle search stream")
    pydoc.add_argument(
        "--loop-max-tokens",
        type=int,
        nargs="+",
        default=[DEFAULT_MAX_TOKENS],
        help="padded tokens a loop batch; several: each is measured, the fastest is the baseline",
    )
    pydoc.add_argument("--loop-spinning", choices=["on", "off"], default="on", help="ONNX Runtime's thread spinning")
    pydoc.add_argument(
        "--quality", action=argparse.BooleanOptionalAction, default=True, help="known-item retrieval after round 1"
    )
    passages = parser.add_argument_group("--corpus passages")
    passages.add_argument("--batch", type=int, default=32, help=f"documents or texts a request (at most {INLINE_MAX})")
    passages.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        if args.corpus == "pydoc":
            args.documents = args.documents or str(SMOKE_DOCUMENTS)
            args.rounds = args.rounds or 1
            if args.documents != "all" and not args.documents.isdigit():
                parser.error("--documents takes a number or 'all'")
            print(asyncio.run(pydoc_benchmark(args, Path(work_dir))))
        else:
            args.documents = int(args.documents or 10_000)
            args.rounds = args.rounds or 3
            if not 1 <= args.batch <= INLINE_MAX:
                parser.error(f"--batch must be 1..{INLINE_MAX}: a larger upsert runs as a job")
            print(asyncio.run(passages_benchmark(args, Path(work_dir))))


if __name__ == "__main__":
    main()

"""Ingestion throughput: chunks/s end to end through the orchestrator, against the served embedder alone.

``--documents`` real passages of varying lengths (``bench/corpus.py``: sentences, paragraphs and
sections of the standard library's docstrings, in the shares of ``DOCUMENT_SHARES``, which its
pools allow at 10k) are ingested over HTTP, in inline upserts of ``--batch`` documents from
``--concurrency`` clients, into a fresh collection (default chunking); the rate is chunks
acknowledged per second. The baseline, in the same run, sends the same chunk texts (cut in this
process by the server's own chunker) straight to the served embedder with ``tritonclient.grpc.aio``,
``--batch`` texts a request from ``--concurrency`` clients. Each round runs the baseline, then the
ingestion into a collection of its own; the report (markdown, stdout) lists every round, the CPU
time per chunk of each process, and the median ratio against the 0.7x target.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import tritonclient.grpc.aio as grpcclient
from corpus import build_corpus
from embed import percentiles, tree_cpu_seconds
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

from tritonrag.clients.wire.schema import Chunking
from tritonrag.server.ingest.chunking import Chunker

DOCUMENT_SHARES = {"sentence": 0.73, "paragraph": 0.23, "section": 0.04}
TARGET = 0.7
INLINE_MAX = 64  # the server's default ingest.inline_max_documents: larger upserts become jobs


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
    async with httpx2.AsyncClient(base_url=http_url, timeout=600, limits=limits) as http:

        async def send(rows: Sequence[dict[str, Any]]) -> int:
            answer = await post_json(http, f"/v1/collections/{collection}/documents", {"documents": rows})
            return int(answer["chunks"])

        await post_json(http, "/v1/collections", {"name": collection})
        return await closed_loop(batched(documents, batch), concurrency, send)


def report(args: argparse.Namespace, rows: Sequence[Row], chunks: int, kinds: dict[str, int]) -> str:
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
    verdict = "pass" if ratio >= TARGET else f"miss by {1 - ratio / TARGET:.0%}"
    return "\n".join(
        [
            f"{args.documents} documents ({', '.join(f'{n} {kind}s' for kind, n in kinds.items())}; seed {args.seed}) "
            f"= {chunks} chunks of the default chunking; {args.batch} documents (ingestion) or chunk texts "
            f"(embedder alone) a request, {args.concurrency} concurrent clients; {machine()}.",
            "",
            markdown_table(header, table, labels=2),
            "",
            f"Ingestion / embedder alone: {ratio:.2f}x, the median of {len(ratios)} round(s) "
            f"({', '.join(f'{r:.2f}' for r in ratios)}); target >= {TARGET}x: {verdict}.",
        ]
    )


async def benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """Rounds of the baseline and the ingestion against one stack started here; the markdown report."""
    repository = model_repository(args.repository, ["embedder"])
    corpus = build_corpus(args.documents, args.seed, DOCUMENT_SHARES)
    documents = [{"id": f"doc-{n}", "text": passage.text} for n, passage in enumerate(corpus)]
    chunking = Chunking()
    chunker = Chunker.from_version_dir(
        version_dir(repository, "embedder"), chunking.chunk_tokens, chunking.overlap_tokens
    )
    texts = [span.text for passage in corpus for span in chunker.chunk(passage.text)]
    kinds = {kind: sum(p.kind == kind for p in corpus) for kind in DOCUMENT_SHARES}
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
    return report(args, rows, len(texts), kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--documents", type=int, default=10_000, help="documents to ingest")
    parser.add_argument("--batch", type=int, default=32, help=f"documents or texts a request (at most {INLINE_MAX})")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of baseline + ingestion (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling seed")
    args = parser.parse_args()
    if not 1 <= args.batch <= INLINE_MAX:
        parser.error(f"--batch must be 1..{INLINE_MAX}: a larger upsert runs as a job")
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(asyncio.run(benchmark(args, Path(work_dir))))


if __name__ == "__main__":
    main()

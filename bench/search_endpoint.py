"""Search endpoint latency: queries/s, p50 and p95 at each concurrency over HTTP and gRPC, on ``--chunks`` chunks.

The collection is written before the orchestrator starts, straight into its data directory (the
catalog, then ``Collection.open`` + ``upsert``), as the server would have stored it: every
distinct passage of ``bench/corpus.py`` (sentences, paragraphs and sections of docstrings: the
standard library's first, then, while more are needed, those of the installed packages), shuffled
and cut by the server's own chunker (default chunking) until there are ``--chunks`` chunks. Their
vectors are ``--vectors synthetic`` (default: the clustered unit vectors of ``bench/search.py``, a
Gaussian mixture with the neighbourhood structure of text embeddings) or ``real`` (MiniLM in this
process with ONNX Runtime on the served graph: exact, but about as slow as ingesting them).

Queries are real and embedded for real: the summaries (first sentences) of the standard library's
function and class docstrings, sent to ``POST /v1/search`` (HTTP, ``httpx2``) and ``Search`` (gRPC,
``grpc.aio``) with ``top_k`` 10 and no rerank, in dense and hybrid mode, by as many closed-loop
clients as the concurrency. Each configuration gets a warm-up, then ``--requests`` queries (the same
ones for all). The report (markdown, stdout) gives queries/s, client-side p50/p95 and the medians
of the server's own ``timings_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sysconfig
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import numpy as np
import numpy.typing as npt
from corpus import docstrings, passage_pools, stdlib_dir
from embed import ort_embedder, percentiles
from search import DIMENSION, make_data
from stack import closed_loop, machine, markdown_table, model_repository, progress, running_stack, split_summary
from stack import version_dir as newest_version

from tests.serving import ADMIN_HEADERS, ADMIN_METADATA
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import Chunking, CollectionCreate, DocumentIn
from tritonrag.export.runtime.encoding import ModelMetadata, ModelTokenizer
from tritonrag.server.ingest.chunking import Chunker
from tritonrag.server.retrieval.collection import ChunkSpan, Collection, PreparedDocument
from tritonrag.server.store.catalog import Catalog

COLLECTION = "search-bench"
TOP_K = 10
MODES = ("dense", "hybrid")
STAGES = ("embed", "search", "total")
QUERY_WORDS = (3, 20)
WRITE_BATCH = 5000  # documents per upsert while filling the store
EMBED_BATCH = 64  # texts per ONNX Runtime call for --vectors real

Search = Callable[[str], Awaitable[dict[str, float]]]


@dataclass(frozen=True)
class Filled:
    """How many documents and chunks were written, and which vectors."""

    documents: int
    chunks: int
    vectors: str


def passage_texts(seed: int) -> Iterator[str]:
    """Distinct passages of the standard library, then of the installed packages, each shuffled by ``seed``."""
    seen: set[str] = set()
    for root in (stdlib_dir(), Path(sysconfig.get_paths()["purelib"])):
        progress(f"reading passages under {root}")
        texts = [p.text for pool in passage_pools(root).values() for p in pool if p.text not in seen]
        seen.update(texts)
        random.Random(seed).shuffle(texts)
        yield from texts


def fill(data_dir: Path, repository: Path, chunks: int, vectors: str, seed: int) -> Filled:
    """Write the collection of ``chunks`` chunks into ``data_dir`` as the orchestrator keeps it."""
    version = newest_version(repository, "embedder")
    defaults = Chunking()
    chunker = Chunker.from_version_dir(version, defaults.chunk_tokens, defaults.overlap_tokens)
    documents: list[tuple[str, list[ChunkSpan]]] = []
    total = 0
    for text in passage_texts(seed):
        spans = chunker.chunk(text)
        if spans and total + len(spans) <= chunks:
            documents.append((text, spans))
            total += len(spans)
        if total == chunks:
            break
    else:
        raise ValueError(f"the passages give only {total} chunks, not {chunks}")
    texts = [span.text for _, spans in documents for span in spans]
    dimension = ModelMetadata.read(version).dimension
    assert dimension is not None, "an embedder's metadata has its dimension"
    if vectors == "real":
        matrix = real_vectors(version, texts, dimension)
    elif dimension == DIMENSION:
        matrix = make_data("clustered", len(texts), 0, seed)[0]
    else:
        raise ValueError(f"the embedder is {dimension}-d; synthetic vectors are {DIMENSION}-d")
    progress(f"writing {len(documents)} documents ({chunks} chunks) into the store")
    spec = CollectionCreate(name=COLLECTION)
    catalog = Catalog(data_dir / "catalog.sqlite")
    catalog.create_collection(spec)
    catalog.close()
    collection = Collection.open(data_dir / "collections" / COLLECTION, spec, dimension)
    bounds = np.cumsum([0, *(len(spans) for _, spans in documents)])
    for first in range(0, len(documents), WRITE_BATCH):
        batch = enumerate(documents[first : first + WRITE_BATCH], first)
        collection.upsert(
            [
                PreparedDocument(DocumentIn(id=f"doc-{n}", text=text), spans, matrix[bounds[n] : bounds[n + 1]])
                for n, (text, spans) in batch
            ]
        )
    collection.close()
    return Filled(len(documents), chunks, vectors)


def real_vectors(version: Path, texts: Sequence[str], dimension: int) -> npt.NDArray[np.float32]:
    """The embedder's vectors of ``texts`` by ONNX Runtime in this process, in batches of texts of similar length."""
    embed = ort_embedder(version, ModelTokenizer.from_version_dir(version))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    matrix = np.empty((len(texts), dimension), np.float32)
    for first in range(0, len(order), EMBED_BATCH):
        rows = order[first : first + EMBED_BATCH]
        matrix[rows] = embed([texts[i] for i in rows])
        if (first // EMBED_BATCH) % 100 == 0:
            progress(f"embedded {first + len(rows)}/{len(texts)} chunks in process")
    return matrix


def queries(count: int, seed: int) -> list[str]:
    """``count`` distinct summaries of standard-library docstrings, drawn with ``seed``."""
    summaries = {split_summary(doc)[0] for _, doc in docstrings(stdlib_dir())}
    fitting = sorted(s for s in summaries if QUERY_WORDS[0] <= len(s.split()) <= QUERY_WORDS[1])
    return random.Random(seed).sample(fitting, count)


def checked(hits: int, degraded: Sequence[str], timings: dict[str, float]) -> dict[str, float]:
    """The server's timings of an answer with ``TOP_K`` hits and nothing degraded."""
    if hits != TOP_K or degraded:
        raise RuntimeError(f"an answer had {hits} hits (expected {TOP_K}), degraded: {list(degraded)}")
    return timings


@dataclass
class Row:
    """One configuration: queries/s, client-side latency and the median server timings (ms)."""

    transport: str
    mode: str
    concurrency: int
    qps: float
    p50_ms: float
    p95_ms: float
    server_ms: dict[str, float]


async def measure(
    transport: str, mode: str, concurrency: int, search: Search, texts: Sequence[str], warm_up: int
) -> Row:
    """A warm-up, then every query of ``texts`` through ``search`` from ``concurrency`` clients."""
    await closed_loop(texts[:warm_up], concurrency, search)
    run = await closed_loop(texts, concurrency, search)
    p50, p95 = percentiles(run.latencies_ms, [50, 95])
    server = {stage: statistics.median(t[stage] for t in run.results) for stage in STAGES}
    row = Row(transport, mode, concurrency, len(texts) / run.seconds, p50, p95, server)
    progress(f"{transport} {mode} c={concurrency}: {row.qps:.1f} q/s, p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    return row


def http_search(http: httpx2.AsyncClient, mode: str) -> Search:
    """``POST /v1/search`` in ``mode``."""

    async def search(query: str) -> dict[str, float]:
        body = {"collection": COLLECTION, "query": query, "top_k": TOP_K, "mode": mode}
        response = await http.post("/v1/search", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/search: {response.status_code} {response.text}")
        answer = response.json()
        return checked(len(answer["hits"]), answer["degraded"], answer["timings_ms"])

    return search


def grpc_search(stub: pb_grpc.TritonRagAsyncStub, mode: str) -> Search:
    """The ``Search`` RPC in ``mode``."""

    async def search(query: str) -> dict[str, float]:
        request = pb.SearchRequest(collection=COLLECTION, query=query, top_k=TOP_K, mode=mode)
        answer = await stub.Search(request, metadata=ADMIN_METADATA)
        return checked(len(answer.hits), answer.degraded, dict(answer.timings_ms))

    return search


async def measure_all(http_url: str, grpc_url: str, args: argparse.Namespace, texts: Sequence[str]) -> list[Row]:
    """Every mode x transport x concurrency, in that order."""
    rows = []
    top = max(args.concurrency)
    limits = httpx2.Limits(max_connections=top, max_keepalive_connections=top)
    async with (
        httpx2.AsyncClient(base_url=http_url, timeout=60, limits=limits, headers=ADMIN_HEADERS) as http,
        grpc.aio.insecure_channel(grpc_url) as channel,
    ):
        stub = pb_grpc.TritonRagStub(channel)
        for mode in MODES:
            for transport, search in (("HTTP", http_search(http, mode)), ("gRPC", grpc_search(stub, mode))):
                for concurrency in args.concurrency:
                    rows.append(await measure(transport, mode, concurrency, search, texts, 2 * concurrency))
    return rows


def report(rows: Sequence[Row], filled: Filled, info: dict[str, Any], requests: int) -> str:
    table = [
        [
            row.transport,
            row.mode,
            str(row.concurrency),
            f"{row.qps:.1f}",
            f"{row.p50_ms:.1f}",
            f"{row.p95_ms:.1f}",
            *(f"{row.server_ms[stage]:.1f}" for stage in STAGES),
        ]
        for row in rows
    ]
    header = ["transport", "mode", "concurrency", "queries/s", "p50 ms", "p95 ms"]
    header += [f"server {stage} ms (median)" for stage in STAGES]
    return "\n".join(
        [
            f"{info['chunks']} chunks of {info['documents']} documents ({filled.vectors} vectors), "
            f"index {info['active_index']}; {requests} queries per row, top_k {TOP_K}, no rerank; {machine()}.",
            "",
            markdown_table(header, table, labels=2),
        ]
    )


async def benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """Fill a collection, start the stack on it and measure every configuration; the markdown report."""
    repository = model_repository(args.repository, ["embedder"])
    data_dir = work_dir / "data"
    filled = fill(data_dir, repository, args.chunks, args.vectors, args.seed)
    texts = queries(args.requests, args.seed)
    # The uncached path: every query embedded and searched (bench/cache.py measures the cache).
    with running_stack(repository, ["embedder"], data_dir, work_dir, TRITONRAG_CACHE__ENABLED="false") as stack:
        http_url = stack.orchestrator.http_url
        async with httpx2.AsyncClient(base_url=http_url, timeout=600, headers=ADMIN_HEADERS) as http:
            info = (await http.get(f"/v1/collections/{COLLECTION}")).json()  # opens the collection
        if info["chunks"] != filled.chunks:
            raise RuntimeError(f"the server sees {info['chunks']} chunks, {filled.chunks} were written")
        rows = await measure_all(http_url, stack.orchestrator.grpc_url, args, texts)
    return report(rows, filled, info, args.requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks in the collection")
    parser.add_argument("--vectors", choices=["synthetic", "real"], default="synthetic", help="stored chunk vectors")
    parser.add_argument("--requests", type=int, default=500, help="measured queries per configuration")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="concurrent clients")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passages, vectors and queries")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(asyncio.run(benchmark(args, Path(work_dir))))


if __name__ == "__main__":
    main()

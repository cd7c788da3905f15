"""What metrics and access logs cost a search: the same uncached hybrid search through the real HTTP app, with
telemetry off, metrics only, JSON access lines only, and both on, in one run.

The app is ``create_http_app`` over the real ``SearchService`` on a real collection (SQLite, FAISS, BM25),
with a stand-in for Triton that embeds by hashing words (the other services are the test fakes), driven
in-process over ASGI so that the network does not drown the difference. Every query goes through every
configuration in turn (in a random order); the table gives each configuration's median and p90 latency and
its median CPU time per request (the process's, every thread's), against telemetry off.

    .venv/bin/python bench/metrics_overhead.py [--documents 2000] [--requests 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import httpx2
import numpy as np
import numpy.typing as npt
from stack import markdown_table

from tests.fakes import FakeServices, open_guard
from tests.unit.test_services import vector
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn
from tritonrag.server.api.admission import Admission
from tritonrag.server.api.http import create_http_app
from tritonrag.server.config import ApiSettings, IndexSettings, LimitsSettings, LogFormat, ModelSettings
from tritonrag.server.config import TelemetrySettings as Telemetry
from tritonrag.server.retrieval.collection import ChunkSpan, PreparedDocument
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.retrieval.stages import SearchStages
from tritonrag.server.routing.triton_pool import TritonPool
from tritonrag.server.services.search import SearchService
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.telemetry.logs import configure_logging

DIMENSION = 64
WORDS = [f"w{n}" for n in range(500)]
CONFIGURATIONS = {
    "off": Telemetry(metrics=False, access_log=False),
    "metrics only": Telemetry(access_log=False),
    "access log only": Telemetry(metrics=False, log_format=LogFormat.json),
    "on": Telemetry(log_format=LogFormat.json),
}


class HashingTriton:
    """The one call of a search to Triton, embedding the query, answered in-process."""

    async def embed(
        self,
        texts: Sequence[str],
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        bulk: bool = False,
    ) -> npt.NDArray[np.float32]:
        return np.stack([vector(text, DIMENSION) for text in texts])


async def dimension() -> int:
    return DIMENSION


async def filled(data_dir: Path, documents: int) -> CollectionRegistry:
    """A registry with the collection "bench" of ``documents`` one-chunk documents of 40 words."""
    registry = CollectionRegistry(data_dir, Catalog(data_dir / "catalog.sqlite"), IndexSettings(), dimension)
    collection = await registry.create(CollectionCreate(name="bench"))
    rng = np.random.default_rng(0)
    prepared = []
    for n in range(documents):
        text = " ".join(rng.choice(WORDS, size=40))
        prepared.append(
            PreparedDocument(
                DocumentIn(id=f"d{n}", text=text), [ChunkSpan(text, 0, len(text))], vector(text, DIMENSION)[None]
            )
        )
    await asyncio.to_thread(collection.upsert, prepared)
    return registry


async def timed(client: httpx2.AsyncClient, query: str) -> tuple[float, float]:
    """One search's latency and the process's CPU time over it (every thread's: the search's workers and the
    log writer included), in µs."""
    wall, cpu = time.perf_counter(), time.process_time()
    response = await client.post("/v1/search", json={"collection": "bench", "query": query, "mode": "hybrid"})
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/search: {response.status_code} {response.text}")
    return wall * 1e6, cpu * 1e6


async def measure(
    clients: dict[str, httpx2.AsyncClient], queries: Sequence[str], rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Each configuration's latencies and CPU times: every query is sent through every configuration in turn,
    in a random order, so that whatever else the machine does falls on all of them alike."""
    measured: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in clients}
    order = random.Random(2)
    names = list(clients)
    for _ in range(rounds):
        for query in queries:
            order.shuffle(names)
            for name in names:
                wall, cpu = await timed(clients[name], query)
                measured[name][0].append(wall)
                measured[name][1].append(cpu)
    return measured


async def main(documents: int, requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        registry = await filled(Path(tmp), documents)
        search = SearchService(registry, SearchStages.over(cast(TritonPool, HashingTriton())))
        fakes = FakeServices.create()
        with open(os.devnull, "w") as devnull:
            # The access lines are formatted and written, to nowhere.
            logs = configure_logging(CONFIGURATIONS["on"], devnull)
            clients = {
                name: httpx2.AsyncClient(
                    transport=httpx2.ASGITransport(
                        create_http_app(
                            fakes.collections,
                            search,
                            fakes.answers,
                            fakes.readiness,
                            fakes.answers,
                            fakes.models,
                            ApiSettings(),
                            ModelSettings(),
                            Admission(LimitsSettings()),
                            telemetry,
                            open_guard(),
                        )
                    ),
                    base_url="http://bench",
                )
                for name, telemetry in CONFIGURATIONS.items()
            }
            rng = np.random.default_rng(1)
            queries = [" ".join(rng.choice(WORDS, size=6)) for _ in range(requests)]
            await measure(clients, queries[:100], 1)  # warm-up
            measured = await measure(clients, queries, rounds)
            for client in clients.values():
                await client.aclose()
            logs.stop()
        await registry.close()
        registry.catalog.close()

    medians = {name: (statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in measured.items()}
    off_wall, off_cpu = medians["off"]
    rows = [
        [
            name,
            str(len(wall)),
            f"{medians[name][0]:.0f}",
            f"{np.percentile(wall, 90):.0f}",
            f"{medians[name][0] / off_wall:.3f}",
            f"{medians[name][1]:.0f}",
            f"{medians[name][1] / off_cpu:.3f}",
        ]
        for name, (wall, cpu) in measured.items()
    ]
    print(f"hybrid search over {documents} documents, {requests} requests x {rounds} rounds per configuration")
    header = ["telemetry", "requests", "median µs", "p90 µs", "median / off", "median CPU µs", "CPU / off"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.documents, arguments.requests, arguments.rounds))

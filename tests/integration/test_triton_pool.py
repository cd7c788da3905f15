"""TritonPool against two real Triton servers: one is killed mid-run, then restarted."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tritonrag.deploy.launcher import TritonEndpoints, TritonServer
from tritonrag.server.config import RoutingSettings
from tritonrag.server.errors import InvalidArgumentError
from tritonrag.server.routing.endpoints import EndpointStatus
from tritonrag.server.routing.resilience import BreakerState
from tritonrag.server.routing.triton_pool import TritonPool
from tritonrag.server.services.models import served_version_dir

TEXTS = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(["cats", "ships", "tea", "rain"] * 5)]

SETTINGS = RoutingSettings(
    probe_interval_s=0.2,
    probe_timeout_s=0.5,
    breaker_failures=2,
    breaker_cooldown_s=1.0,
    attempt_timeout_s=5.0,
    request_timeout_s=20.0,
    max_attempts=4,
    backoff_base_s=0.02,
    backoff_max_s=0.2,
)


@pytest.fixture(scope="module")
def embedder_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a tiny exported embedder."""
    tiny_models = pytest.importorskip("tests.tiny_models", reason="tests/tiny_models.py is not there yet")
    repository: Path = tiny_models.export_tiny_repository(tmp_path_factory.mktemp("repository"), ["embedder"])
    return repository


def new_server(repository: Path, work_dir: Path) -> TritonServer:
    endpoints = TritonEndpoints.on_free_ports()
    return TritonServer(repository, endpoints, ["embedder"], work_dir, log_stream=io.StringIO())


@pytest.fixture
def servers(embedder_repository: Path, tmp_path: Path) -> Iterator[tuple[TritonServer, TritonServer]]:
    a, b = new_server(embedder_repository, tmp_path / "a"), new_server(embedder_repository, tmp_path / "b")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


def inference_count(server: TritonServer) -> int:
    """Requests the embedder has served since this Triton process started."""
    url = f"http://{server.endpoints.http_url}/v2/models/embedder/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.loads(response.read())
    return sum(int(s.get("inference_count", 0)) for s in stats["model_stats"])


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def test_requests_survive_a_killed_endpoint_and_its_breaker_closes_after_restart(
    servers: tuple[TritonServer, TritonServer], embedder_repository: Path
) -> None:
    a, b = servers

    async def scenario() -> None:
        async with TritonPool([a.endpoints.grpc_url, b.endpoints.grpc_url], SETTINGS) as pool:

            def status_of(server: TritonServer) -> EndpointStatus:
                return next(s for s in pool.status() if s.url == server.endpoints.grpc_url)

            assert await pool.ready("embedder") and not await pool.ready("reranker")
            version = await pool.model_version("embedder")
            assert (served_version_dir(embedder_repository, version) / "tokenizer.json").is_file()

            reference = await pool.embed(TEXTS, request_id="reference")
            assert reference.dtype == np.float32 and reference.shape[0] == len(TEXTS)
            np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-4)
            with pytest.raises(InvalidArgumentError, match="text is empty"):
                await pool.embed(["fine", " "])

            failures: list[BaseException] = []
            served = 0
            stop = asyncio.Event()

            async def client() -> None:
                nonlocal served
                while not stop.is_set():
                    try:
                        vectors = await pool.embed(TEXTS)
                    except Exception as exc:
                        failures.append(exc)
                        continue
                    np.testing.assert_allclose(vectors, reference, atol=1e-4)
                    served += 1

            await eventually(lambda: status_of(a).ready and status_of(b).ready, 10, "both servers are probed ready")
            clients = [asyncio.create_task(client()) for _ in range(4)]
            # Both carry load; waiting for it, not for a request count, since one fast server can take
            # a burst alone while the other's probe answer is in flight.
            await eventually(lambda: inference_count(a) > 0 and inference_count(b) > 0, 30, "both servers carry load")

            assert a.pid is not None
            os.killpg(a.pid, signal.SIGKILL)  # Triton and its Python-backend stubs
            served_at_kill = served
            await eventually(lambda: not status_of(a).ready, 5, "the probe sees the killed server")
            await eventually(lambda: status_of(a).breaker is not BreakerState.closed, 5, "its breaker opens")
            await eventually(lambda: served >= served_at_kill + 10, 30, "the survivor serves on")
            assert failures == []

            await asyncio.to_thread(a.start)
            await eventually(lambda: status_of(a).ready, 10, "the restarted server is probed ready")
            await eventually(lambda: inference_count(a) > 0, 30, "the restarted server takes requests again")
            await eventually(lambda: status_of(a).breaker is BreakerState.closed, 10, "its breaker closes")
            stop.set()
            await asyncio.gather(*clients)
            assert failures == []
            assert {s.breaker for s in pool.status()} == {BreakerState.closed}

    asyncio.run(scenario())

"""Model roll-outs on a real tritonserver: validation, canary, automatic and operator rollbacks, repository updates,
two endpoints; every scenario under a steady load of unpinned requests that must never fail."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.serving import running_triton
from tests.tiny_models import tiny_cross_encoder
from tritonrag.clients.wire.models import ModelStatus, RolloutPolicy, VersionState
from tritonrag.clients.wire.schema import JobInfo
from tritonrag.deploy.launcher import TritonEndpoints, TritonLaunchError, TritonServer
from tritonrag.export.exporter import export_model
from tritonrag.export.repository import RUNTIME_PACKAGE
from tritonrag.server.config import ModelSettings, RolloutSettings, RoutingSettings
from tritonrag.server.errors import FailedPreconditionError
from tritonrag.server.lifecycle.controller import RolloutController
from tritonrag.server.lifecycle.state import RolloutState
from tritonrag.server.routing.triton_pool import TritonPool

PASSAGES = ["Triton serves models.", "Canaries move traffic step by step.", "A rollback restores a version."]
ROUTING = RoutingSettings(probe_interval_s=0.5, backoff_base_s=0.01, backoff_max_s=0.05)
ROLLOUT = RolloutSettings(
    canary_steps=[0.25, 0.5],
    step_dwell_s=1.0,
    min_requests=5,
    max_canary_errors=3,
    max_latency_ratio=3.0,  # a busy 2-core machine: the bound is not what these tests are about
    watch_interval_s=0.5,
    default_policy="canary",
)
# Runtime changes for versions that pass the file checks (their runtime hash matches: they were exported so).
BROKEN_AFTER_WARMUP = """
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls > 2:
            raise RuntimeError("this runtime breaks after two calls")
"""
BROKEN_ALWAYS = """
        raise RuntimeError("this runtime raises on every request")
"""


class NoCollections:
    """The collections' side of an embedder roll-out, for a stack that serves no embedder here."""

    async def embedder_versions_in_use(self) -> set[str]:
        return set()

    async def reindex_all(self, version: str) -> list[JobInfo]:
        return []


@pytest.fixture(scope="module")
def reranker_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cross_encoder(tmp_path_factory.mktemp("sources") / "cross-encoder")


def export_reranker(source: Path, repository: Path, runtime_change: str | None = None) -> str:
    """A new reranker version; with ``runtime_change`` inserted at the start of ``TextModel.execute``'s body."""
    if runtime_change is None:
        return str(export_model(f"path:{source}", "reranker", repository, max_sequence_length=32).version)
    with tempfile.TemporaryDirectory() as scratch:
        runtime = Path(scratch) / "runtime"
        shutil.copytree(RUNTIME_PACKAGE, runtime, ignore=shutil.ignore_patterns("__pycache__"))
        text_model = runtime / "text_model.py"
        code = text_model.read_text()
        anchor = "        encoded = self.encode_all(requests)\n"
        assert code.count(anchor) == 1
        text_model.write_text(code.replace(anchor, runtime_change.lstrip("\n") + anchor))
        result = export_model(f"path:{source}", "reranker", repository, max_sequence_length=32, runtime_dir=runtime)
    return str(result.version)


class Load:
    """Clients sending unpinned rerank requests without pause; every failure is kept."""

    def __init__(self, pool: TritonPool, clients: int = 3) -> None:
        self._pool = pool
        self.failures: list[str] = []
        self.answered = 0
        self._tasks = [asyncio.create_task(self._client()) for _ in range(clients)]

    async def _client(self) -> None:
        while True:
            try:
                scores = await self._pool.rerank("what moves traffic?", PASSAGES)
                assert scores.shape == (len(PASSAGES),)
                self.answered += 1
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(f"{time.time():.2f} {exc!r}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@asynccontextmanager
async def controlled(
    urls: list[str], repository: Path, data_dir: Path, rollout: RolloutSettings = ROLLOUT
) -> AsyncIterator[tuple[RolloutController, TritonPool]]:
    """A pool over ``urls`` and a started roll-out controller for the reranker."""
    async with TritonPool(urls, ROUTING, ModelSettings()) as pool:
        state = RolloutState(data_dir)
        controller = RolloutController(pool, state, repository, ModelSettings(), rollout, NoCollections())
        await controller.start()
        try:
            yield controller, pool
        finally:
            await controller.close()


async def until(
    controller: RolloutController, done: Callable[[ModelStatus], bool], what: str, timeout_s: float = 90.0
) -> ModelStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await controller.status("reranker")
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s} s: {status.model_dump_json(indent=1)}")
        await asyncio.sleep(0.2)


def state_of(status: ModelStatus, version: str) -> VersionState:
    return next(v.state for v in status.versions if v.version == version)


@contextmanager
def triton(repository: Path, work_dir: Path) -> Iterator[TritonServer]:
    with running_triton(repository, ["reranker"], work_dir) as server:
        yield server


def test_canary_promotion_automatic_and_operator_rollbacks_and_repository_updates_fail_no_request(
    reranker_source: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    first = export_reranker(reranker_source, repository)

    async def scenario(url: str) -> None:
        async with controlled([url], repository, tmp_path / "data") as (controller, pool):
            status = await controller.status("reranker")
            assert (status.stable, state_of(status, first)) == (first, VersionState.stable)  # adopted
            load = Load(pool)

            # A good version: a canary through both steps, then stable; the old version is unloaded.
            good = await asyncio.to_thread(export_reranker, reranker_source, repository)
            status = await controller.publish("reranker", good, RolloutPolicy.canary)
            assert (status.canary, status.canary_share) == (good, 0.25)
            status = await until(controller, lambda s: s.stable == good, "the canary's promotion")
            assert state_of(status, first) is VersionState.previous
            events = [e.event for e in reversed(status.events) if e.version == good]  # oldest first
            assert events == ["validating", "canary started", "stepped", "promoted"]
            served = await until(controller, lambda s: not _loaded(s, first), "the old version's unload")
            assert [v.traffic.requests > 0 for v in served.versions if v.version == good] == [True]

            # A version that breaks after its smoke test: the canary catches it and rolls back by itself.
            flaky = await asyncio.to_thread(export_reranker, reranker_source, repository, BROKEN_AFTER_WARMUP)
            await controller.publish("reranker", flaky, RolloutPolicy.canary)
            status = await until(
                controller, lambda s: state_of(s, flaky) is VersionState.rolled_back, "the automatic rollback"
            )
            flaky_info = next(v for v in status.versions if v.version == flaky)
            assert flaky_info.reason.startswith("automatic: ") and "breaks after two calls" in flaky_info.reason
            assert status.stable == good and status.canary is None
            assert flaky_info.traffic.errors >= ROLLOUT.max_canary_errors

            # A version whose runtime raises on every request is refused by validation and never served.
            broken = await asyncio.to_thread(export_reranker, reranker_source, repository, BROKEN_ALWAYS)
            with pytest.raises(FailedPreconditionError, match="raises on every request"):
                await controller.publish("reranker", broken, RolloutPolicy.immediate)
            status = await controller.status("reranker")
            assert state_of(status, broken) is VersionState.failed and status.stable == good
            assert not _loaded(status, broken)

            # An operator's rollback returns to the previous version.
            status = await controller.rollback("reranker", "drill")
            assert status.stable == first and state_of(status, good) is VersionState.rolled_back

            # Repository updates: a corrupt copy is refused and reported; a good copy is rolled out.
            corrupt = str(int(broken) + 1)
            shutil.copytree(repository / "reranker" / first, repository / "reranker" / corrupt)
            (repository / "reranker" / corrupt / "model.onnx").write_bytes(b"not an ONNX model")
            status = await until(
                controller,
                lambda s: any(v.version == corrupt and v.state is VersionState.failed for v in s.versions),
                "the corrupt copy's report",
            )
            assert "model.onnx" in next(v.reason for v in status.versions if v.version == corrupt)
            assert not _loaded(status, corrupt)
            copied = str(int(corrupt) + 1)
            shutil.copytree(repository / "reranker" / good, repository / "reranker" / copied)
            await until(controller, lambda s: s.stable == copied, "the copied version's roll-out")

            # Retire: nothing needed is touched; of the rest only the newest directories stay.
            status = await controller.retire("reranker", keep=2)
            on_disk = sorted(int(p.name) for p in (repository / "reranker").iterdir() if p.name.isdigit())
            assert on_disk == [int(corrupt), int(copied)]
            retired = {v.version for v in status.versions if v.state is VersionState.retired}
            assert retired == {first, good, flaky, broken}

            await load.stop()
            assert load.failures == []
            assert load.answered > 100

    with triton(repository, tmp_path / "work") as server:
        asyncio.run(scenario(server.endpoints.grpc_url))


def _loaded(status: ModelStatus, version: str) -> bool:
    return any(v.version == version and v.loaded_on for v in status.versions)


def test_two_endpoints_switch_only_when_both_have_the_version(reranker_source: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    first = export_reranker(reranker_source, shared)
    lagging = tmp_path / "lagging"  # a second server whose repository has not received the next version
    shutil.copytree(shared, lagging)

    async def scenario(urls: list[str]) -> None:
        async with controlled(urls, shared, tmp_path / "data") as (controller, pool):
            load = Load(pool)
            second = await asyncio.to_thread(export_reranker, reranker_source, shared)
            with pytest.raises(FailedPreconditionError, match="could not load"):
                await controller.publish("reranker", second, RolloutPolicy.immediate)
            status = await controller.status("reranker")
            assert status.stable == first and state_of(status, second) is VersionState.failed
            shutil.copytree(shared / "reranker" / second, lagging / "reranker" / second)
            third = await asyncio.to_thread(export_reranker, reranker_source, shared)
            shutil.copytree(shared / "reranker" / third, lagging / "reranker" / third)
            status = await controller.publish("reranker", third, RolloutPolicy.immediate)
            assert status.stable == third
            assert sorted(next(v.loaded_on for v in status.versions if v.version == third)) == sorted(urls)
            await load.stop()
            assert load.failures == []

    with triton(shared, tmp_path / "work-a") as a, triton(lagging, tmp_path / "work-b") as b:
        asyncio.run(scenario([a.endpoints.grpc_url, b.endpoints.grpc_url]))


def test_the_launcher_loads_only_the_versions_the_state_names(reranker_source: Path, tmp_path: Path) -> None:
    """A corrupt version dropped into the repository while the stack was down would be the newest: started with the
    roll-out state's versions, Triton never loads it (started on the config's policy alone, it fails to start)."""
    repository = tmp_path / "repository"
    first = export_reranker(reranker_source, repository)
    shutil.copytree(repository / "reranker" / first, repository / "reranker" / "2")
    (repository / "reranker" / "2" / "model.onnx").write_bytes(b"not an ONNX model")
    endpoints = TritonEndpoints.on_free_ports()
    server = TritonServer(repository, endpoints, ["reranker"], tmp_path / "work", versions={"reranker": [first]})
    with server:
        index = grpcclient.InferenceServerClient(endpoints.grpc_url).get_model_repository_index()
        assert [(m.version, m.state) for m in index.models] == [(first, "READY")]
    with pytest.raises(TritonLaunchError, match="version 2"):
        TritonServer(repository, endpoints, ["reranker"], tmp_path / "work").start()

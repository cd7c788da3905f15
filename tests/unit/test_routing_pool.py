"""TritonPool routing, retries, breakers and error mapping against fake Triton clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from tests.clock import FakeClock
from tritonrag.clients.wire.schema import (
    REQUEST_ID_HEADER,
    ChatMessage,
    FinishReason,
    GenerationDelta,
    ModelVersion,
    SamplingParams,
)
from tritonrag.export.runtime.contract import BUSY_ERROR, INPUT_ERROR
from tritonrag.server.config import RoutingSettings
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tritonrag.server.routing.resilience import BreakerState
from tritonrag.server.routing.triton_pool import TritonPool, work_slices
from tritonrag.server.routing.versions import Route
from tritonrag.server.services.models import served_version_dir
from tritonrag.server.telemetry.record import RequestRecord, recording

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def rpc_error(status: str, message: str = "boom") -> InferenceServerException:
    return InferenceServerException(msg=message, status=f"StatusCode.{status}")


def embedding(text: str) -> list[float]:
    """A recognisable fake vector: the text's length and its first character."""
    return [float(len(text)), float(ord(text[0]))]


@dataclass
class Call:
    model: str
    rows: list[str]
    request_id: str
    headers: dict[str, str]
    timeout: float | None
    priority: int = 0
    version: str = ""
    parameters: dict[str, Any] | None = None


@dataclass
class FakeTriton:
    """One fake endpoint: scripted failures, optional latency, and a record of what it was asked."""

    url: str
    server_ready: bool = True
    # model -> its ready versions, comma-separated
    models: dict[str, str] = field(default_factory=lambda: {"embedder": "1", "reranker": "3", "generator": "2"})
    broken: set[tuple[str, str]] = field(default_factory=set)  # (model, version) whose runtime raises
    on_unknown_version: Callable[[], None] | None = None  # called when a request names a version not loaded
    max_batch_size: int = 4
    max_request_tokens: int | None = None  # the config parameter, when set
    instances: int = 1
    probe_latency_s: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0
    failures: list[InferenceServerException] = field(default_factory=list)
    latency_s: float = 0.0
    gate: asyncio.Event | None = None
    calls: list[Call] = field(default_factory=list)
    closed: bool = False
    # Generation: the words each stream sends, or the error message it answers with at once.
    stream_errors: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=lambda: ["Par", "is", "."])
    streams: list[FakeStream] = field(default_factory=list)

    async def is_server_live(self, *, client_timeout: float | None = None) -> bool:
        if client_timeout is not None and self.probe_latency_s > client_timeout:
            await asyncio.sleep(client_timeout)
            raise rpc_error("DEADLINE_EXCEEDED", "Deadline Exceeded")
        if not self.server_ready:
            raise rpc_error("UNAVAILABLE", "connection refused")
        return True

    async def load_model(
        self, model_name: str, *, config: str | None = None, client_timeout: float | None = None
    ) -> None:
        raise AssertionError("the pool never loads models")

    async def get_model_repository_index(self, *, client_timeout: float | None = None) -> Any:
        entries = [
            SimpleNamespace(name=name, version=version, state="READY")
            for name, versions in self.models.items()
            for version in versions.split(",")
        ]
        return SimpleNamespace(models=[*entries, SimpleNamespace(name="embedder", version="9", state="LOADING")])

    async def get_model_config(
        self, model_name: str, model_version: str, *, client_timeout: float | None = None
    ) -> Any:
        parameters = {}
        if self.max_request_tokens is not None:
            parameters["max_request_tokens"] = SimpleNamespace(string_value=str(self.max_request_tokens))
        config = SimpleNamespace(
            max_batch_size=self.max_batch_size,
            parameters=parameters,
            instance_group=[SimpleNamespace(count=self.instances)],
        )
        return SimpleNamespace(config=config)

    async def infer(
        self,
        model_name: str,
        inputs: list[Any],
        model_version: str = "",
        *,
        request_id: str,
        headers: dict[str, str],
        client_timeout: float | None,
        priority: int = 0,
        parameters: dict[str, Any] | None = None,
    ) -> Any:
        columns = [[b.decode() for b in deserialize_bytes_tensor(i._get_content())] for i in inputs]
        call = Call(model_name, columns[-1], request_id, headers, client_timeout, priority, model_version, parameters)
        self.calls.append(call)
        if model_version and model_version not in self.models.get(model_name, "").split(","):
            if self.on_unknown_version is not None:
                self.on_unknown_version()
            raise rpc_error("UNAVAILABLE", f"Request for unknown model: '{model_name}' version {model_version}")
        if (model_name, model_version) in self.broken:
            raise rpc_error("INTERNAL", "the runtime raised")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._answer(model_name, columns, client_timeout)
        finally:
            self.in_flight -= 1

    async def _answer(self, model_name: str, columns: list[list[str]], client_timeout: float | None) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        if self.latency_s:
            if client_timeout is not None and self.latency_s > client_timeout:
                await asyncio.sleep(client_timeout)
                raise rpc_error("DEADLINE_EXCEEDED", "Deadline Exceeded")
            await asyncio.sleep(self.latency_s)
        if self.failures:
            raise self.failures.pop(0)
        if not self.server_ready:
            raise rpc_error("UNAVAILABLE", "connection refused")
        if model_name == "embedder":
            out = np.array([embedding(t) for t in columns[0]], dtype=np.float32)
            return SimpleNamespace(as_numpy=lambda name: out if name == "EMBEDDING" else None)
        scores = np.array([[len(p) - len(q)] for q, p in zip(*columns, strict=True)], dtype=np.float32)
        return SimpleNamespace(as_numpy=lambda name: scores if name == "SCORE" else None)

    async def close(self) -> None:
        self.closed = True

    def stream_infer(
        self, inputs_iterator: AsyncIterator[dict[str, Any]], stream_timeout: float | None, headers: dict[str, str]
    ) -> FakeStream:
        error = self.stream_errors.pop(0) if self.stream_errors else None
        stream = FakeStream(inputs_iterator, list(self.words), error, broken=self.broken)
        self.streams.append(stream)
        return stream


@dataclass
class FakeStream:
    """One generation stream: a delta per word, the last with finish reason "stop", or one error."""

    requests: AsyncIterator[dict[str, Any]]
    words: list[str]
    error: str | None
    sent: int = 0
    cancelled: bool = False
    drained: bool = False
    request: dict[str, str] = field(default_factory=dict)
    broken: set[tuple[str, str]] = field(default_factory=set)
    version: str = ""

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> tuple[Any, Any]:
        if not self.request:
            first = await anext(self.requests)
            self.request = {i.name(): deserialize_bytes_tensor(i._get_content())[0].decode() for i in first["inputs"]}
            self.version = first.get("model_version", "")
            if (first["model_name"], self.version) in self.broken:
                self.error = "the runtime raised"
        if self.error is not None:
            error, self.error = self.error, None
            return None, InferenceServerException(msg=error)
        if self.cancelled or self.sent == len(self.words):
            self.drained = not self.cancelled
            raise StopAsyncIteration
        self.sent += 1
        last = self.sent == len(self.words)
        values = {
            "TEXT": np.array([self.words[self.sent - 1].encode()], dtype=np.object_),
            "FINISH_REASON": np.array([b"stop" if last else b""], dtype=np.object_),
            "PROMPT_TOKENS": np.array([7], dtype=np.int32),
            "COMPLETION_TOKENS": np.array([self.sent], dtype=np.int32),
        }
        return SimpleNamespace(as_numpy=values.__getitem__), None

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Fleet:
    """Fake endpoints by url, and a factory the pool uses to reach them."""

    def __init__(self, *fakes: FakeTriton) -> None:
        self.fakes = {f.url: f for f in fakes}

    def __call__(self, url: str) -> FakeTriton:
        return self.fakes[url]

    def __getitem__(self, url: str) -> FakeTriton:
        return self.fakes[url]


SETTINGS = RoutingSettings(
    backoff_base_s=0.001,
    backoff_max_s=0.002,
    probe_interval_s=3600,
    breaker_failures=2,
    breaker_cooldown_s=10.0,
    max_attempts=3,
)


def pool_of(fleet: Fleet, settings: RoutingSettings = SETTINGS, clock: Callable[[], float] | None = None) -> TritonPool:
    return TritonPool(
        list(fleet.fakes), settings, client_factory=fleet, clock=clock or time.monotonic, rng=random.Random(0)
    )


def test_embed_splits_into_max_batch_rows_and_keeps_order() -> None:
    fleet = Fleet(FakeTriton("a:1", max_batch_size=3))
    texts = [f"{'x' * i}{chr(97 + i)}" for i in range(10)]

    async def scenario() -> npt.NDArray[np.float32]:
        async with pool_of(fleet) as pool:
            return await pool.embed(texts, request_id="req-1")

    vectors = run(scenario())
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, np.array([embedding(t) for t in texts], dtype=np.float32))
    calls = fleet["a:1"].calls
    assert sorted(len(c.rows) for c in calls) == [1, 3, 3, 3]
    assert {c.request_id for c in calls} == {"req-1"}
    assert all(c.headers == {REQUEST_ID_HEADER: "req-1"} for c in calls)


def test_rerank_sends_pairs_and_returns_a_flat_vector() -> None:
    fleet = Fleet(FakeTriton("a:1"))

    async def scenario() -> npt.NDArray[np.float32]:
        async with pool_of(fleet) as pool:
            return await pool.rerank("q", ["a", "bbb", "cc", "dddd", "e"])

    scores = run(scenario())
    assert scores.shape == (5,)
    np.testing.assert_array_equal(scores, [0, 2, 1, 3, 0])
    assert all(c.model == "reranker" for c in fleet["a:1"].calls)


def test_empty_inputs_need_no_request() -> None:
    fleet = Fleet(FakeTriton("a:1"))

    async def scenario() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        async with pool_of(fleet) as pool:
            return await pool.embed([]), await pool.rerank("q", [])

    vectors, scores = run(scenario())
    assert vectors.shape[0] == 0 and scores.shape == (0,)
    assert fleet["a:1"].calls == []


def test_least_outstanding_requests_wins() -> None:
    fleet = Fleet(FakeTriton("a:1", gate=asyncio.Event()), FakeTriton("b:1", gate=asyncio.Event()))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            held = [asyncio.create_task(pool.embed(["held"])) for _ in range(4)]
            await asyncio.sleep(0.01)
            assert [s.outstanding for s in pool.status()] == [2, 2]  # spread evenly
            gate_b = fleet["b:1"].gate
            assert gate_b is not None
            gate_b.set()  # b answers from now on; a stays busy
            await asyncio.sleep(0.01)
            assert [s.outstanding for s in pool.status()] == [2, 0]
            for _ in range(5):
                await pool.embed(["next"])
            assert [s.outstanding for s in pool.status()] == [2, 0]
            gate_a = fleet["a:1"].gate
            assert gate_a is not None
            gate_a.set()
            await asyncio.gather(*held)
            assert [s.outstanding for s in pool.status()] == [0, 0]

    run(scenario())
    assert [c.rows for c in fleet["b:1"].calls] == [["held"]] * 2 + [["next"]] * 5


def test_unavailable_is_retried_on_another_endpoint() -> None:
    fleet = Fleet(FakeTriton("a:1"), FakeTriton("b:1"))
    for fake in fleet.fakes.values():
        fake.failures = [rpc_error("UNAVAILABLE")]

    async def scenario() -> npt.NDArray[np.float32]:
        async with pool_of(fleet) as pool:
            return await pool.embed(["hello"])

    np.testing.assert_array_equal(run(scenario()), [embedding("hello")])
    calls = fleet["a:1"].calls + fleet["b:1"].calls
    assert len(calls) == 3  # a and b failed once each, the third attempt succeeded
    assert len(fleet["a:1"].calls) >= 1 and len(fleet["b:1"].calls) >= 1


def test_invalid_argument_is_not_retried_and_keeps_tritons_message() -> None:
    fleet = Fleet(FakeTriton("a:1", failures=[rpc_error("INVALID_ARGUMENT", "TEXT[0]: text is empty")]))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            await pool.embed([" "])

    with pytest.raises(InvalidArgumentError, match=r"TEXT\[0\]: text is empty"):
        run(scenario())
    assert len(fleet["a:1"].calls) == 1


def test_other_triton_errors_are_unavailable_without_retry() -> None:
    fleet = Fleet(FakeTriton("a:1", failures=[rpc_error("INTERNAL", "stub crashed")]))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            await pool.embed(["x"])

    with pytest.raises(UnavailableError, match=r"\[INTERNAL\] stub crashed"):
        run(scenario())
    assert len(fleet["a:1"].calls) == 1


def test_one_failing_sub_batch_fails_the_call_and_cancels_the_rest() -> None:
    fleet = Fleet(FakeTriton("a:1", max_batch_size=1, latency_s=0.05))
    fleet["a:1"].failures = [rpc_error("INVALID_ARGUMENT", "bad row")]

    async def scenario() -> list[int]:
        async with pool_of(fleet) as pool:
            with pytest.raises(InvalidArgumentError, match="bad row"):
                await pool.embed(["a", "b", "c"])
            return [s.outstanding for s in pool.status()]

    assert run(scenario()) == [0]


def test_breakers_open_then_the_pool_is_unavailable_at_once() -> None:
    clock = FakeClock()
    fleet = Fleet(FakeTriton("a:1"), FakeTriton("b:1"))
    for fake in fleet.fakes.values():
        fake.failures = [rpc_error("UNAVAILABLE")] * 10

    async def scenario() -> None:
        async with pool_of(fleet, clock=clock) as pool:
            with pytest.raises(UnavailableError, match="failed after 3 attempts"):
                await pool.embed(["x"])
            with pytest.raises(UnavailableError, match="no Triton endpoint can serve 'embedder'"):
                await pool.embed(["x"])
            assert {s.breaker for s in pool.status()} == {BreakerState.open}
            assert not await pool.ready("embedder")
            calls_before = sum(len(f.calls) for f in fleet.fakes.values())
            with pytest.raises(UnavailableError):
                await pool.embed(["x"])
            assert sum(len(f.calls) for f in fleet.fakes.values()) == calls_before  # refused without trying

            # After the cool-down one trial per endpoint goes through; a success closes that breaker.
            for fake in fleet.fakes.values():
                fake.failures.clear()
            clock.now += SETTINGS.breaker_cooldown_s
            assert {s.breaker for s in pool.status()} == {BreakerState.half_open}
            assert await pool.ready("embedder")
            await pool.embed(["x"])
            assert sorted(s.breaker for s in pool.status()) == [BreakerState.closed, BreakerState.half_open]

    run(scenario())


def test_probe_excludes_endpoints_that_are_down_and_readmits_them() -> None:
    fleet = Fleet(FakeTriton("a:1", server_ready=False), FakeTriton("b:1"))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            for _ in range(4):
                await pool.embed(["x"])
            assert fleet["a:1"].calls == []
            fleet["a:1"].server_ready = True
            await pool.probe()
            assert all(s.ready for s in pool.status())
            fleet["b:1"].server_ready = False
            await pool.probe()
            for _ in range(3):
                await pool.embed(["x"])
            assert len(fleet["a:1"].calls) == 3

    run(scenario())


def test_model_readiness_and_versions_come_from_the_probe() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "2"}), FakeTriton("b:1", models={"embedder": "3"}))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            assert await pool.ready() and await pool.ready("embedder")
            assert not await pool.ready("reranker")
            assert await pool.model_version("embedder") == ModelVersion(name="embedder", version="3")
            with pytest.raises(UnavailableError, match="no Triton endpoint serves a ready 'reranker'"):
                await pool.model_version("reranker")
            with pytest.raises(UnavailableError, match="reranker"):
                await pool.rerank("q", ["p"])
            fleet["a:1"].models["reranker"] = "5"  # loaded after the last probe: found on demand
            assert await pool.model_version("reranker") == ModelVersion(name="reranker", version="5")

    run(scenario())


def test_model_unloaded_since_the_probe_is_routed_around() -> None:
    fleet = Fleet(FakeTriton("a:1"), FakeTriton("b:1"))
    fleet["a:1"].failures = [rpc_error("NOT_FOUND", "Request for unknown model: 'embedder' is not found")]

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            while not fleet["a:1"].calls:
                await pool.embed(["x"])
            assert [sorted(s.models) for s in pool.status()] == [
                ["generator", "reranker"],
                ["embedder", "generator", "reranker"],
            ]
            assert {s.breaker for s in pool.status()} == {BreakerState.closed}
            calls_to_a = len(fleet["a:1"].calls)
            for _ in range(3):
                await pool.embed(["x"])
            assert len(fleet["a:1"].calls) == calls_to_a
            await pool.probe()  # the next probe finds it again
            assert [sorted(s.models) for s in pool.status()] == [["embedder", "generator", "reranker"]] * 2

    run(scenario())


def test_deadline_exceeded_when_the_endpoint_is_too_slow() -> None:
    fleet = Fleet(FakeTriton("a:1", latency_s=1.0))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            with pytest.raises(DeadlineExceededError, match="within the deadline"):
                await pool.embed(["x"], deadline_s=0.05)
            # The caller's own deadline says nothing about the endpoint.
            assert [s.breaker for s in pool.status()] == [BreakerState.closed]

    run(scenario())
    assert fleet["a:1"].calls[0].timeout == pytest.approx(0.05, abs=0.01)


def test_a_hung_endpoint_times_out_per_attempt_the_call_moves_on_and_its_probes_open_its_breaker() -> None:
    settings = SETTINGS.model_copy(update={"attempt_timeout_s": 0.05, "probe_timeout_s": 0.05})
    fleet = Fleet(FakeTriton("a:1", latency_s=10.0), FakeTriton("b:1"))

    async def scenario() -> tuple[dict[str, BreakerState], int]:
        async with pool_of(fleet, settings) as pool:
            for _ in range(10):
                np.testing.assert_array_equal(await pool.embed(["x"], deadline_s=2.0), [embedding("x")])
            # A request out of time says nothing sure about the endpoint: its breaker is the probes' to open.
            assert [s.breaker for s in pool.status()] == [BreakerState.closed, BreakerState.closed]
            fleet["a:1"].probe_latency_s = 10.0
            for _ in range(settings.breaker_failures):
                await pool.probe()
            calls = len(fleet["a:1"].calls)
            for _ in range(5):
                await pool.embed(["x"], deadline_s=2.0)
            return {s.url: s.breaker for s in pool.status()}, calls

    states, calls = run(scenario())
    assert states == {"a:1": BreakerState.open, "b:1": BreakerState.closed}
    assert len(fleet["a:1"].calls) == calls  # then it is left alone


def test_a_late_probe_keeps_the_endpoint_and_a_refused_one_drops_it() -> None:
    settings = SETTINGS.model_copy(update={"probe_timeout_s": 0.05})
    fleet = Fleet(FakeTriton("a:1"))

    async def scenario() -> list[tuple[bool, BreakerState, int]]:
        seen = []
        async with pool_of(fleet, settings) as pool:
            fleet["a:1"].probe_latency_s = 10.0
            await pool.probe()
            seen.append((pool.status()[0].ready, pool.status()[0].breaker, pool.status()[0].breaker_openings))
            fleet["a:1"].probe_latency_s = 0.0
            await pool.probe()  # a good probe ends the run of failures
            await pool.probe()
            seen.append((pool.status()[0].ready, pool.status()[0].breaker, pool.status()[0].breaker_openings))
            fleet["a:1"].server_ready = False
            await pool.probe()
            seen.append((pool.status()[0].ready, pool.status()[0].breaker, pool.status()[0].breaker_openings))
            for _ in range(settings.breaker_failures):
                await pool.probe()
            seen.append((pool.status()[0].ready, pool.status()[0].breaker, pool.status()[0].breaker_openings))
        return seen

    assert run(scenario()) == [
        (True, BreakerState.closed, 0),
        (True, BreakerState.closed, 0),
        (False, BreakerState.closed, 0),
        (False, BreakerState.open, 1),
    ]


def test_work_slices_cut_by_rows_and_by_estimated_tokens() -> None:
    assert work_slices([10] * 5, max_rows=2, max_tokens=None) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert work_slices([10, 10, 10, 30, 5], max_rows=8, max_tokens=25) == [
        slice(0, 2),
        slice(2, 3),
        slice(3, 4),  # a row over the budget goes alone
        slice(4, 5),
    ]
    assert work_slices([], max_rows=4, max_tokens=10) == []


def test_requests_are_sized_by_the_models_token_budget() -> None:
    fleet = Fleet(FakeTriton("a:1", max_batch_size=64, max_request_tokens=100))
    texts = ["y" * 90] * 3 + ["z" * 9] * 12  # 32 and 5 estimated tokens each

    async def scenario() -> npt.NDArray[np.float32]:
        async with pool_of(fleet) as pool:
            return await pool.embed(texts)

    np.testing.assert_array_equal(run(scenario()), [embedding(t) for t in texts])
    assert [len(c.rows) for c in fleet["a:1"].calls] == [3, 12]


def test_bulk_work_waits_for_the_lanes_and_yields_to_interactive_work() -> None:
    fleet = Fleet(FakeTriton("a:1", max_batch_size=1, instances=3, latency_s=0.02))
    texts = [f"chunk {i}" for i in range(12)]

    async def scenario() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        async with pool_of(fleet) as pool:
            bulk = asyncio.create_task(pool.embed(texts, bulk=True))
            await asyncio.sleep(0.01)
            query = await pool.embed(["what is new?"])
            return await bulk, query

    bulk, query = run(scenario())
    np.testing.assert_array_equal(bulk, [embedding(t) for t in texts])
    np.testing.assert_array_equal(query, [embedding("what is new?")])
    calls = fleet["a:1"].calls
    assert fleet["a:1"].most_in_flight == 2 + 1  # the bulk lanes (one per instance but one) and the query
    assert {c.priority for c in calls if c.rows == ["what is new?"]} == {1}
    assert {c.priority for c in calls if c.rows != ["what is new?"]} == {2}
    # Bulk requests are marked for the model, which runs them on its lower-priority thread.
    assert [c.parameters for c in calls if c.rows == ["what is new?"]] == [None]
    assert all(c.parameters == {"tritonrag_bulk": True} for c in calls if c.rows != ["what is new?"])
    # The query did not wait for the bulk work: it was answered before the last bulk rows were sent.
    assert calls.index(next(c for c in calls if c.rows == ["what is new?"])) < len(calls) - 1


def test_close_closes_every_client() -> None:
    fleet = Fleet(FakeTriton("a:1"), FakeTriton("b:1"))

    async def scenario() -> None:
        pool = pool_of(fleet)
        await pool.start()
        await pool.close()

    run(scenario())
    assert all(f.closed for f in fleet.fakes.values())


def test_served_version_dir(tmp_path: Path) -> None:
    version = tmp_path / "embedder" / "4"
    version.mkdir(parents=True)
    with pytest.raises(UnavailableError, match=r"embedder version 4 has no tokenizer\.json"):
        served_version_dir(tmp_path, ModelVersion(name="embedder", version="4"))
    (version / "tokenizer.json").write_text("{}")
    assert served_version_dir(tmp_path, ModelVersion(name="embedder", version="4")) == version


def test_generate_streams_deltas_and_closes_the_stream() -> None:
    fleet = Fleet(FakeTriton("a:1"))
    params = SamplingParams(max_tokens=5, stop=["\n"])

    async def scenario() -> list[GenerationDelta]:
        async with pool_of(fleet) as pool:
            return [d async for d in pool.generate(params, prompt="Capital of France?", request_id="r-9")]

    deltas = run(scenario())
    assert [d.text for d in deltas] == ["Par", "is", "."]
    assert deltas[-1].finish_reason == FinishReason.stop and deltas[0].finish_reason is None
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (7, 3)
    stream = fleet["a:1"].streams[0]
    assert stream.request["PROMPT"] == "Capital of France?"
    assert json.loads(stream.request["PARAMETERS"])["stop"] == ["\n"]
    assert not stream.cancelled and stream.drained  # a finished stream is read to its end, not cancelled


def test_generate_sends_messages_as_json_and_a_consumer_that_leaves_cancels() -> None:
    fleet = Fleet(FakeTriton("a:1"))

    async def scenario() -> str:
        async with pool_of(fleet) as pool:
            deltas = pool.generate(SamplingParams(), messages=[ChatMessage(role="user", content="hi")])
            async with contextlib.aclosing(deltas):
                first = await anext(deltas)
            return first.text

    assert run(scenario()) == "Par"
    stream = fleet["a:1"].streams[0]
    assert json.loads(stream.request["MESSAGES"]) == [{"role": "user", "content": "hi"}]
    assert stream.cancelled and stream.sent == 1


def test_generate_retries_a_busy_endpoint_and_reports_all_busy() -> None:
    busy = f"{BUSY_ERROR}64 requests are waiting already"
    fleet = Fleet(FakeTriton("a:1", stream_errors=[busy] * 3), FakeTriton("b:1", stream_errors=[busy] * 3))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            [d async for d in pool.generate(SamplingParams(), prompt="x")]

    with pytest.raises(ResourceExhaustedError, match="every generator is busy"):
        run(scenario())
    assert len(fleet["a:1"].streams) + len(fleet["b:1"].streams) == SETTINGS.max_attempts

    fleet = Fleet(FakeTriton("a:1", stream_errors=[busy]), FakeTriton("b:1"))
    # One busy endpoint: the other answers (whichever the pool tried first).
    texts = run(_collect(fleet))
    assert texts == "Paris."


async def _collect(fleet: Fleet) -> str:
    async with pool_of(fleet) as pool:
        return "".join([d.text async for d in pool.generate(SamplingParams(), prompt="x")])


def test_generate_input_errors_are_not_retried() -> None:
    refused = f"{INPUT_ERROR}max_tokens 9000 leaves no room"
    fleet = Fleet(FakeTriton("a:1", stream_errors=[refused]), FakeTriton("b:1", stream_errors=[refused]))

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            [d async for d in pool.generate(SamplingParams(), prompt="x")]

    with pytest.raises(InvalidArgumentError, match=r"^max_tokens 9000 leaves no room$"):
        run(scenario())
    assert len(fleet["a:1"].streams) + len(fleet["b:1"].streams) == 1


def test_generate_records_its_timings_and_tokens_in_the_request_record() -> None:
    busy = f"{BUSY_ERROR}64 requests are waiting already"
    fleet = Fleet(FakeTriton("a:1", stream_errors=[busy]), FakeTriton("b:1", stream_errors=[busy]))
    record = RequestRecord("http", "POST")

    async def scenario() -> str:
        with recording(record):
            return await _collect(fleet)

    assert run(scenario()) == "Paris."
    (generation,) = record.generations  # one generation, its busy attempt included
    assert generation.model == "generator" and generation.first_token_s is not None and generation.first_token_s > 0
    assert len(generation.inter_token_s) == 2  # three deltas
    assert (generation.prompt_tokens, generation.completion_tokens) == (7, 3)


def test_unrouted_calls_pin_the_newest_ready_version() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "1,2", "reranker": "3", "generator": "2"}))

    async def scenario() -> str:
        async with pool_of(fleet) as pool:
            await pool.embed(["abc"])
            return (await pool.model_version("embedder")).version

    assert run(scenario()) == "2"
    assert [c.version for c in fleet["a:1"].calls] == ["2"]


def test_a_pinned_version_goes_only_to_endpoints_that_serve_it() -> None:
    fleet = Fleet(
        FakeTriton("a:1", models={"embedder": "2", "reranker": "3", "generator": "2"}),
        FakeTriton("b:1", models={"embedder": "1,2", "reranker": "3", "generator": "2"}),
    )

    async def scenario() -> None:
        async with pool_of(fleet) as pool:
            for _ in range(6):
                await pool.embed(["abc"], version="1")
            with pytest.raises(UnavailableError, match="version 7"):
                await pool.embed(["abc"], version="7")

    run(scenario())
    assert fleet["a:1"].calls == []
    assert [c.version for c in fleet["b:1"].calls] == ["1"] * 6


def test_routes_split_unpinned_traffic_by_share_and_count_each_version() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "1", "reranker": "3,4", "generator": "2"}))

    async def scenario() -> dict[str, int]:
        async with pool_of(fleet) as pool:
            pool.routes.set("reranker", Route("3", "4", 0.25))
            for _ in range(400):
                await pool.rerank("q", ["passage"])
            assert (await pool.model_version("reranker")).version == "3"  # the stable version
            return {v: pool.version_stats.total("reranker", v).requests for v in ("3", "4")}

    counts = run(scenario())
    assert counts["3"] + counts["4"] == 400
    assert 60 <= counts["4"] <= 140  # a quarter, drawn at random (seeded)
    assert Counter(c.version for c in fleet["a:1"].calls) == counts


def test_a_failing_canary_version_is_answered_by_the_stable_one_and_spares_the_breaker() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "1", "reranker": "3,4", "generator": "2"}))
    fleet["a:1"].broken.add(("reranker", "4"))

    async def scenario() -> tuple[int, int, BreakerState]:
        async with pool_of(fleet) as pool:
            pool.routes.set("reranker", Route("3", "4", 0.5))
            for _ in range(40):
                scores = await pool.rerank("q", ["passage"])
                assert scores.tolist() == [6.0]
            canary, stable = pool.version_stats.total("reranker", "4"), pool.version_stats.total("reranker", "3")
            assert "the runtime raised" in canary.last_error
            return canary.errors, stable.requests, pool.status()[0].breaker

    canary_errors, stable_requests, breaker = run(scenario())
    assert canary_errors > 5  # about half the calls drew the canary first
    assert stable_requests == 40  # every call was answered by version 3
    assert breaker is BreakerState.closed


def test_a_version_unloaded_since_the_probe_is_routed_around() -> None:
    fleet = Fleet(
        FakeTriton("a:1", models={"embedder": "1,2", "reranker": "3", "generator": "2"}),
        FakeTriton("b:1", models={"embedder": "1,2", "reranker": "3", "generator": "2"}),
    )

    async def scenario() -> tuple[tuple[str, ...], set[BreakerState]]:
        async with pool_of(fleet) as pool:
            fleet["a:1"].models["embedder"] = "2"  # version 1 unloaded on a:1 after the probe
            for _ in range(4):
                await pool.embed(["abc"], version="1")
            return pool.ready_versions("embedder")["a:1"], {s.breaker for s in pool.status()}

    versions_on_a, breakers = run(scenario())
    assert versions_on_a == ("2",)  # forgotten until the next probe
    assert breakers == {BreakerState.closed}
    assert len([c for c in fleet["a:1"].calls if c.version == "1"]) <= 1
    assert [c.version for c in fleet["b:1"].calls].count("1") >= 3


def test_generation_goes_to_the_routed_version_and_a_failing_canary_falls_back() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "1", "reranker": "3", "generator": "2,5"}))

    fleet["a:1"].broken.add(("generator", "5"))

    async def scenario() -> tuple[list[str], int, int]:
        async with pool_of(fleet) as pool:
            pool.routes.set("generator", Route("2", "5", 0.5))
            texts = ["".join([d.text async for d in pool.generate(SamplingParams(), prompt="x")]) for _ in range(20)]
            stats = pool.version_stats
            return texts, stats.total("generator", "5").errors, stats.total("generator", "2").requests

    texts, canary_errors, stable_answers = run(scenario())
    assert texts == ["Par" + "is" + "."] * 20
    assert stable_answers == 20
    tried = [s.version for s in fleet["a:1"].streams]
    assert canary_errors == tried.count("5") > 0


def test_a_call_on_the_version_a_roll_out_just_left_goes_to_the_version_it_moved_to() -> None:
    fleet = Fleet(FakeTriton("a:1", models={"embedder": "1", "reranker": "3,4", "generator": "2"}))

    async def scenario() -> list[float]:
        async with pool_of(fleet) as pool:
            pool.routes.set("reranker", Route("3"))
            fleet["a:1"].models["reranker"] = "4"  # version 3 unloaded: the switch to 4 lands during the call
            fleet["a:1"].on_unknown_version = lambda: pool.routes.set("reranker", Route("4"))
            return [float(score) for score in await pool.rerank("q", ["passage"])]

    assert run(scenario()) == [6.0]
    assert [c.version for c in fleet["a:1"].calls] == ["3", "4"]

"""``TritonPool``: the only door to Triton.

Requests go over ``tritonclient.grpc.aio`` to several Triton endpoints. Each request is sent to
the routable endpoint (server and model ready at the last health probe, circuit breaker not open)
with the fewest requests outstanding. Transient failures (UNAVAILABLE, a broken connection, one
attempt's timeout) are retried on another endpoint when there is one, after a jittered exponential
backoff, as long as the call's deadline allows. Triton's INVALID_ARGUMENT is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tritonrag.clients.wire.schema import ChatMessage, FinishReason, GenerationDelta, ModelVersion, SamplingParams
from tritonrag.export.runtime.contract import (
    BUSY_ERROR,
    INPUT_ERROR,
    TOKENIZER_FILE,
    EmbedderTensors,
    GeneratorTensors,
    RerankerTensors,
)
from tritonrag.server.config import RoutingSettings, Settings
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TritonRagError,
    UnavailableError,
)

from .resilience import BreakerState, CircuitBreaker, backoff_delay

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
Floats = npt.NDArray[np.float32]


class TritonClient(Protocol):
    """What the pool uses of ``tritonclient.grpc.aio.InferenceServerClient``."""

    async def is_server_ready(self, *, client_timeout: float | None = None) -> bool: ...

    async def is_model_ready(self, model_name: str, *, client_timeout: float | None = None) -> bool: ...

    async def get_model_metadata(self, model_name: str, *, client_timeout: float | None = None) -> Any: ...

    async def get_model_config(
        self, model_name: str, model_version: str, *, client_timeout: float | None = None
    ) -> Any: ...

    async def infer(
        self,
        model_name: str,
        inputs: list[Any],
        *,
        request_id: str,
        headers: dict[str, str],
        client_timeout: float | None,
    ) -> Any: ...

    def stream_infer(
        self, inputs_iterator: AsyncIterator[dict[str, Any]], stream_timeout: float | None, headers: dict[str, str]
    ) -> Any: ...

    async def close(self) -> None: ...


def grpc_client(url: str) -> TritonClient:
    """A real asyncio gRPC client to the Triton server at ``url`` (``host:port``)."""
    client: TritonClient = aioclient.InferenceServerClient(url)
    return client


def served_version_dir(repository: Path, model: ModelVersion) -> Path:
    """The served version's folder in the model repository (its ``tokenizer.json``, for chunking).

    The orchestrator runs beside Triton on the same repository in the embedded setup.
    """
    version_dir = repository / model.name / model.version
    if not (version_dir / TOKENIZER_FILE).is_file():
        raise UnavailableError(
            f"{model.name} version {model.version} has no {TOKENIZER_FILE} under {repository}; "
            f"the orchestrator needs the model repository Triton serves from"
        )
    return version_dir


@dataclass(frozen=True)
class ServedModel:
    """A model as one endpoint serves it."""

    version: str
    max_batch_rows: int


@dataclass
class Endpoint:
    """One Triton server and what the pool knows about it."""

    url: str
    client: TritonClient
    breaker: CircuitBreaker
    outstanding: int = 0
    ready: bool = False
    models: dict[str, ServedModel] = field(default_factory=dict)

    def routable(self, model: str) -> bool:
        return self.ready and model in self.models and self.breaker.available()


@dataclass(frozen=True)
class EndpointStatus:
    """A snapshot of one endpoint, for readiness reports and tests."""

    url: str
    ready: bool
    breaker: BreakerState
    outstanding: int
    models: dict[str, str]  # model -> ready version


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may not."""


@dataclass
class _Attempts:
    """How one call's attempts went: how many were made, and the last failure."""

    made: int = 0
    last: str = "no attempt was made"


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "").removeprefix("StatusCode.")


class TritonPool:
    """Clients to several Triton endpoints with routing, health probes, breakers and retries."""

    def __init__(
        self,
        urls: Sequence[str],
        settings: RoutingSettings,
        client_factory: Callable[[str], TritonClient] = grpc_client,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not urls:
            raise ValueError("TritonPool needs at least one endpoint")
        self.settings = settings
        self._client_factory = client_factory
        self._clock = clock
        self._rng = rng or random.Random()
        self._urls = list(dict.fromkeys(urls))
        models = [settings.embedder_model, settings.reranker_model, settings.generator_model]
        self._models = [*models, settings.fallback_generator_model] if settings.fallback_generator_model else models
        self._endpoints: list[Endpoint] = []
        self._probe_task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TritonPool:
        """A pool to ``routing.endpoints``, or to the local Triton when none are listed."""
        urls = settings.routing.endpoints or [f"{settings.triton.address}:{settings.triton.grpc_port}"]
        return cls(urls, settings.routing)

    async def start(self) -> None:
        """Open the clients, probe every endpoint once, and keep probing in the background."""
        if self._endpoints:
            return
        self._endpoints = [
            Endpoint(
                url,
                self._client_factory(url),
                CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s, self._clock),
            )
            for url in self._urls
        ]
        await self.probe()
        self._probe_task = asyncio.create_task(self._probe_forever(), name="triton-pool-probe")

    async def close(self) -> None:
        """Stop probing and close every client."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        for endpoint in self._endpoints:
            await endpoint.client.close()
        self._endpoints = []

    async def __aenter__(self) -> TritonPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Health

    async def probe(self) -> None:
        """Probe every endpoint now: server ready, then each model's readiness, version and batch size."""
        await asyncio.gather(*(self._probe(endpoint) for endpoint in self._endpoints))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            await self.probe()

    async def _probe(self, endpoint: Endpoint) -> None:
        timeout = self.settings.probe_timeout_s
        models: dict[str, ServedModel] = {}
        try:
            ready = bool(await endpoint.client.is_server_ready(client_timeout=timeout))
            for name in self._models if ready else []:
                if await endpoint.client.is_model_ready(name, client_timeout=timeout):
                    models[name] = await self._served_model(endpoint, name, timeout)
        except Exception as exc:  # a probe must survive anything the endpoint does
            if endpoint.ready:
                log.warning("Triton endpoint %s failed its health probe: %s", endpoint.url, exc)
            ready, models = False, {}
        if ready and not endpoint.ready:
            log.info("Triton endpoint %s is ready (models: %s)", endpoint.url, ", ".join(models) or "none")
        endpoint.ready, endpoint.models = ready, models

    async def _served_model(self, endpoint: Endpoint, name: str, timeout: float) -> ServedModel:
        metadata = await endpoint.client.get_model_metadata(name, client_timeout=timeout)
        version = max((str(v) for v in metadata.versions), key=int)
        known = endpoint.models.get(name)
        if known is not None and known.version == version:
            return known
        config = await endpoint.client.get_model_config(name, version, client_timeout=timeout)
        return ServedModel(version, max(1, int(config.config.max_batch_size)))

    async def ready(self, model: str | None = None) -> bool:
        """Whether some endpoint can take requests now (for ``model``, when given)."""
        if model is None:
            return any(e.ready and e.breaker.available() for e in self._endpoints)
        return any(e.routable(model) for e in self._endpoints)

    def status(self) -> list[EndpointStatus]:
        """Every endpoint's state."""
        return [
            EndpointStatus(
                e.url, e.ready, e.breaker.state(), e.outstanding, {name: m.version for name, m in e.models.items()}
            )
            for e in self._endpoints
        ]

    async def model_version(self, name: str) -> ModelVersion:
        """The version of ``name`` that the routable endpoints serve (the newest, during a roll-out)."""
        served = self._served(name)
        if not served:  # e.g. loaded since the last probe
            await self.probe()
            served = self._served(name)
        if not served:
            raise UnavailableError(f"no Triton endpoint serves a ready '{name}'")
        return ModelVersion(name=name, version=max((m.version for m in served), key=int))

    def _served(self, name: str) -> list[ServedModel]:
        return [e.models[name] for e in self._endpoints if e.routable(name)]

    # Inference

    async def embed(
        self, texts: Sequence[str], deadline_s: float | None = None, request_id: str | None = None
    ) -> Floats:
        """L2-normalised embeddings, float32 ``[len(texts), dim]``, in the order of ``texts``."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        model = self.settings.embedder_model

        def inputs(rows: slice) -> list[Any]:
            return [_bytes_input(EmbedderTensors.TEXT, texts[rows])]

        return await self._infer_rows(model, len(texts), inputs, EmbedderTensors.EMBEDDING, deadline_s, request_id)

    async def rerank(
        self, query: str, passages: Sequence[str], deadline_s: float | None = None, request_id: str | None = None
    ) -> Floats:
        """Relevance of each passage to ``query``, float32 ``[len(passages)]``; higher is better."""
        if not passages:
            return np.zeros((0,), dtype=np.float32)
        model = self.settings.reranker_model

        def inputs(rows: slice) -> list[Any]:
            chunk = passages[rows]
            return [
                _bytes_input(RerankerTensors.QUERY, [query] * len(chunk)),
                _bytes_input(RerankerTensors.PASSAGE, chunk),
            ]

        scores = await self._infer_rows(model, len(passages), inputs, RerankerTensors.SCORE, deadline_s, request_id)
        return scores.reshape(-1)

    async def _infer_rows(
        self,
        model: str,
        rows: int,
        inputs: Callable[[slice], list[Any]],
        output: str,
        deadline_s: float | None,
        request_id: str | None,
    ) -> Floats:
        """Send ``rows`` in requests of at most the model's max batch rows, concurrently; stack the outputs."""
        deadline = self._clock() + (deadline_s if deadline_s is not None else self.settings.request_timeout_s)
        request_id = request_id or uuid.uuid4().hex
        served = self._served(model)
        if not served:
            raise UnavailableError(f"no Triton endpoint can serve '{model}' now")
        step = min(m.max_batch_rows for m in served)
        slices = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
        calls = [self._infer(model, inputs(s), output, deadline, request_id) for s in slices]
        parts = await _gather_first_error(calls)
        return np.concatenate(parts).astype(np.float32, copy=False)

    async def _infer(self, model: str, inputs: list[Any], output: str, deadline: float, request_id: str) -> Floats:
        """One request, retried on transient failures while attempts and the deadline allow."""
        attempts = _Attempts()
        async with contextlib.aclosing(self._attempt_endpoints(model, deadline, attempts)) as endpoints:
            async for endpoint, remaining in endpoints:
                try:
                    return await self._attempt(endpoint, model, inputs, output, remaining, request_id)
                except _RetryableError as exc:
                    attempts.last = f"{endpoint.url}: {exc}"
                    log.info("request %s to %s failed, attempt %d: %s", request_id, endpoint.url, attempts.made, exc)
        if attempts.made < self.settings.max_attempts:
            raise UnavailableError(f"no Triton endpoint can serve '{model}' now ({attempts.last})")
        if deadline <= self._clock():
            raise DeadlineExceededError(f"'{model}' did not answer within the deadline ({attempts.last})")
        raise UnavailableError(f"'{model}' failed after {self.settings.max_attempts} attempts ({attempts.last})")

    async def _attempt_endpoints(
        self, model: str, deadline: float, attempts: _Attempts
    ) -> AsyncGenerator[tuple[Endpoint, float]]:
        """The endpoint for each attempt of one call, and the time left: untried endpoints first, a jittered
        backoff before each retry. Ends when the attempts are used up or no endpoint is routable; a deadline
        that passes first is ``DeadlineExceededError``."""
        tried: list[Endpoint] = []
        for attempt in range(self.settings.max_attempts):
            if attempt:
                pause = backoff_delay(attempt - 1, self.settings.backoff_base_s, self.settings.backoff_max_s, self._rng)
                await asyncio.sleep(min(pause, max(0.0, deadline - self._clock())))
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceededError(f"'{model}' did not answer within the deadline ({attempts.last})")
            endpoint = self._pick(model, tried)
            if endpoint is None:
                return
            tried.append(endpoint)
            attempts.made += 1
            yield endpoint, remaining

    async def generate(
        self,
        params: SamplingParams,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        deadline_s: float | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> AsyncGenerator[GenerationDelta]:
        """Stream a generation from ``model`` (default: the generator) for ``prompt`` (raw text) or ``messages``.

        Deltas arrive as the model produces them; the last has the finish reason and token counts.
        Until the first delta, an unavailable or busy endpoint is retried on another; closing the
        iterator early (a client that went away) closes the stream, and Triton cancels the generation.
        A full queue on every endpoint is ``ResourceExhaustedError``.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("generate takes a prompt or messages, not both")
        model = model or self.settings.generator_model
        deadline = self._clock() + (deadline_s if deadline_s is not None else self.settings.generate_timeout_s)
        request_id = request_id or uuid.uuid4().hex
        text_input = (
            (GeneratorTensors.PROMPT, prompt)
            if prompt is not None
            else (GeneratorTensors.MESSAGES, _messages_json(messages or []))
        )
        inputs = [
            _scalar_bytes_input(*text_input),
            _scalar_bytes_input(GeneratorTensors.PARAMETERS, params.model_dump_json()),
        ]
        attempts = _Attempts()
        async with contextlib.aclosing(self._attempt_endpoints(model, deadline, attempts)) as endpoints:
            async for endpoint, _ in endpoints:
                async with contextlib.aclosing(self._stream(endpoint, model, inputs, deadline, request_id)) as stream:
                    try:
                        first = await anext(stream)
                    except _RetryableError as exc:
                        attempts.last = f"{endpoint.url}: {exc}"
                        continue
                    yield first
                    async for delta in stream:
                        yield delta
                    return
        if BUSY_ERROR in attempts.last:
            raise ResourceExhaustedError(f"every generator is busy; retry later ({attempts.last})")
        raise UnavailableError(f"no Triton endpoint can serve '{model}' now ({attempts.last})")

    async def _stream(
        self, endpoint: Endpoint, model: str, inputs: list[Any], deadline: float, request_id: str
    ) -> AsyncGenerator[GenerationDelta]:
        """One generation on one endpoint; ``_RetryableError`` before the first delta for what another may fix."""
        done = asyncio.Event()

        async def request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}
            await done.wait()  # keep the stream open: closing it cancels the generation

        endpoint.breaker.acquire()
        endpoint.outstanding += 1
        responses = endpoint.client.stream_infer(
            request(), stream_timeout=max(0.001, deadline - self._clock()), headers={REQUEST_ID_HEADER: request_id}
        )
        started = ended = False
        try:
            async for result, error in responses:
                if error is not None:
                    ended = True  # an error response is the request's last
                    raise self._stream_failed(endpoint, model, str(error.message()), started)
                delta = _delta(result)
                if not started:
                    endpoint.breaker.record_success()
                    started = True
                ended = delta.finish_reason is not None
                yield delta
                if ended:
                    return
            raise self._stream_failed(endpoint, model, "the stream ended before the generation did", started)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                endpoint.breaker.release()
                raise DeadlineExceededError(f"'{model}' did not finish within the deadline") from exc
            raise self._stream_failed(endpoint, model, f"[{exc.code().name}] {exc.details()}", started) from exc
        finally:
            done.set()  # ends the request side of the stream
            if not ended or not await _drained(responses):
                responses.cancel()  # the caller left mid-generation: Triton cancels the request
            endpoint.outstanding -= 1
            if not started:
                endpoint.breaker.release()

    @staticmethod
    def _stream_failed(endpoint: Endpoint, model: str, message: str, started: bool) -> Exception:
        """What a failed generation stream raises: the model's own input and busy errors keep their meaning."""
        if message.startswith(INPUT_ERROR):
            endpoint.breaker.record_success()  # the server is fine; the input is not
            return InvalidArgumentError(message.removeprefix(INPUT_ERROR))
        if message.startswith(BUSY_ERROR) and not started:
            return _RetryableError(message)  # busy, not broken: the breaker is only released
        if not started:
            endpoint.breaker.record_failure()
            return _RetryableError(message)
        return UnavailableError(f"'{model}' failed on {endpoint.url} mid-generation: {message}")

    def _pick(self, model: str, tried: Sequence[Endpoint]) -> Endpoint | None:
        """The routable endpoint with the fewest outstanding requests, preferring those not tried yet."""
        routable = [e for e in self._endpoints if e.routable(model)]
        candidates = [e for e in routable if e not in tried] or routable
        if not candidates:
            return None
        fewest = min(e.outstanding for e in candidates)
        return self._rng.choice([e for e in candidates if e.outstanding == fewest])

    async def _attempt(
        self, endpoint: Endpoint, model: str, inputs: list[Any], output: str, remaining: float, request_id: str
    ) -> Floats:
        """One request to one endpoint; raises ``_RetryableError`` for what another attempt may fix."""
        timeout = min(self.settings.attempt_timeout_s, remaining)
        endpoint.breaker.acquire()
        endpoint.outstanding += 1
        try:
            result = await endpoint.client.infer(
                model,
                inputs,
                request_id=request_id,
                headers={REQUEST_ID_HEADER: request_id},
                client_timeout=timeout,
            )
        except InferenceServerException as exc:  # every RPC failure, a refused connection included
            raise self._failed(endpoint, model, exc, cut_by_deadline=timeout < self.settings.attempt_timeout_s) from exc
        except BaseException:  # cancelled: says nothing about the endpoint
            endpoint.breaker.release()
            raise
        finally:
            endpoint.outstanding -= 1
        endpoint.breaker.record_success()
        values: Floats = np.asarray(result.as_numpy(output), dtype=np.float32)
        return values

    @staticmethod
    def _failed(
        endpoint: Endpoint, model: str, exc: InferenceServerException, cut_by_deadline: bool
    ) -> TritonRagError | _RetryableError:
        """Record the outcome on the endpoint and say what the caller should raise."""
        status, message = _status(exc), str(exc.message())
        if status == "INVALID_ARGUMENT":
            endpoint.breaker.record_success()  # the server is fine; the input is not
            return InvalidArgumentError(message)
        if status == "NOT_FOUND":  # unloaded since the last probe: route around it until the next one
            endpoint.breaker.record_success()
            endpoint.models.pop(model, None)
            return _RetryableError(message)
        if status == "DEADLINE_EXCEEDED" and cut_by_deadline:
            endpoint.breaker.release()  # the caller's deadline, not the endpoint's slowness
            return _RetryableError(message)
        endpoint.breaker.record_failure()
        if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return _RetryableError(message)
        return UnavailableError(f"'{model}' failed on {endpoint.url}: [{status}] {message}")


async def _drained(responses: Any, timeout_s: float = 5.0) -> bool:
    """Read a finished stream to its end, so that it closes without a cancellation; whether it did in time.

    Cancelling a stream whose request already ended can leave Triton's model busy with it (it then
    cannot be unloaded), so a finished generation lets the server close the stream itself.
    """
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in responses:
                pass
    except (TimeoutError, grpc.aio.AioRpcError, InferenceServerException):
        return False
    return True


def _scalar_bytes_input(name: str, text: str) -> Any:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode("utf-8")], dtype=np.object_))
    return tensor


def _messages_json(messages: Sequence[ChatMessage]) -> str:
    return json.dumps([message.model_dump() for message in messages])


def _delta(result: Any) -> GenerationDelta:
    """A ``GenerationDelta`` from one streamed response of the generator model."""
    reason = result.as_numpy(GeneratorTensors.FINISH_REASON).reshape(-1)[0].decode()
    return GenerationDelta(
        text=result.as_numpy(GeneratorTensors.TEXT).reshape(-1)[0].decode("utf-8"),
        finish_reason=FinishReason(reason) if reason else None,
        prompt_tokens=int(result.as_numpy(GeneratorTensors.PROMPT_TOKENS).reshape(-1)[0]),
        completion_tokens=int(result.as_numpy(GeneratorTensors.COMPLETION_TOKENS).reshape(-1)[0]),
    )


def _bytes_input(name: str, texts: Sequence[str]) -> Any:
    array = np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


async def _gather_first_error(calls: Sequence[Coroutine[Any, Any, Floats]]) -> list[Floats]:
    """Run ``calls`` concurrently; on the first error cancel the rest and raise it as is."""
    if len(calls) == 1:
        return [await calls[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [task.result() for task in tasks]

"""``TritonPool``: the only door to Triton: embeddings, reranking scores and generation streams, with retries.

Requests go over ``tritonclient.grpc.aio`` to the endpoints of an ``EndpointSet`` (endpoints.py), each
to the routable endpoint with the fewest requests outstanding. Transient failures (UNAVAILABLE, a
broken connection, one attempt's timeout) are retried on another endpoint when there is one, after a
jittered exponential backoff, as long as the call's deadline allows. Triton's INVALID_ARGUMENT is
never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonrag.clients.wire.schema import REQUEST_ID_HEADER, ChatMessage, FinishReason, GenerationDelta, SamplingParams
from tritonrag.export.runtime.contract import (
    BUSY_ERROR,
    INPUT_ERROR,
    EmbedderTensors,
    GeneratorTensors,
    Priority,
    RerankerTensors,
)
from tritonrag.server.config import Settings
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TritonRagError,
    UnavailableError,
)
from tritonrag.server.telemetry.record import generation

from .endpoints import Endpoint, EndpointSet
from .resilience import backoff_delay

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may not."""


@dataclass
class _Attempts:
    """How one call's attempts went: how many were made, and the last failure."""

    made: int = 0
    last: str = "no attempt was made"


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "").removeprefix("StatusCode.")


class TritonPool(EndpointSet):
    """The inference calls of the orchestrator, over an ``EndpointSet``."""

    @classmethod
    def from_settings(cls, settings: Settings) -> TritonPool:
        """A pool to ``routing.endpoints``, or to the local Triton when none are listed."""
        urls = settings.routing.endpoints or [f"{settings.triton.address}:{settings.triton.grpc_port}"]
        return cls(urls, settings.routing, settings.models)

    async def embed(
        self,
        texts: Sequence[str],
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        bulk: bool = False,
    ) -> Floats:
        """L2-normalised embeddings, float32 ``[len(texts), dim]``, in the order of ``texts``.

        ``bulk`` (ingestion) work waits for the endpoints' bulk lanes and yields to interactive work.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        model = self.models.embedder

        def inputs(rows: slice) -> list[Any]:
            return [_bytes_input(EmbedderTensors.TEXT, texts[rows])]

        tokens = [_estimated_tokens(text) for text in texts]
        output = EmbedderTensors.EMBEDDING
        return await self._infer_rows(model, tokens, inputs, output, deadline_s, request_id, bulk)

    async def rerank(
        self, query: str, passages: Sequence[str], deadline_s: float | None = None, request_id: str | None = None
    ) -> Floats:
        """Relevance of each passage to ``query``, float32 ``[len(passages)]``; higher is better."""
        if not passages:
            return np.zeros((0,), dtype=np.float32)
        model = self.models.reranker

        def inputs(rows: slice) -> list[Any]:
            chunk = passages[rows]
            return [
                _bytes_input(RerankerTensors.QUERY, [query] * len(chunk)),
                _bytes_input(RerankerTensors.PASSAGE, chunk),
            ]

        tokens = [_estimated_tokens(query) + _estimated_tokens(passage) for passage in passages]
        scores = await self._infer_rows(model, tokens, inputs, RerankerTensors.SCORE, deadline_s, request_id, False)
        return scores.reshape(-1)

    async def _infer_rows(
        self,
        model: str,
        tokens: Sequence[int],
        inputs: Callable[[slice], list[Any]],
        output: str,
        deadline_s: float | None,
        request_id: str | None,
        bulk: bool,
    ) -> Floats:
        """Send the rows (``tokens``: each row's estimated tokens) in requests sized by work, concurrently; stack
        the outputs in order.

        A request holds at most the model's max batch rows and its ``max_request_tokens``, so each one is
        short on a healthy server. Without ``deadline_s`` the call's deadline is ``request_timeout_s``, and
        for bulk work it grows with the number of requests each bulk lane has to carry.
        """
        request_id = request_id or uuid.uuid4().hex
        served = self._served(model)
        if not served:
            raise UnavailableError(f"no Triton endpoint can serve '{model}' now")
        budgets = [m.max_request_tokens for m in served if m.max_request_tokens is not None]
        slices = work_slices(tokens, min(m.max_batch_rows for m in served), min(budgets) if budgets else None)
        if deadline_s is None:
            deadline_s = self.settings.request_timeout_s
            if bulk:
                rounds = -(-len(slices) // sum(m.instances + 1 for m in served))
                deadline_s += rounds * self.settings.attempt_timeout_s
        deadline = self._clock() + deadline_s
        calls = [self._infer(model, inputs(s), output, deadline, request_id, bulk) for s in slices]
        parts = await _gather_first_error(calls)
        return np.concatenate(parts).astype(np.float32, copy=False)

    async def _infer(
        self, model: str, inputs: list[Any], output: str, deadline: float, request_id: str, bulk: bool
    ) -> Floats:
        """One request, retried on transient failures while attempts and the deadline allow."""
        attempts = _Attempts()
        async with contextlib.aclosing(self._attempt_endpoints(model, deadline, attempts)) as endpoints:
            async for endpoint, remaining in endpoints:
                try:
                    return await self._attempt(endpoint, model, inputs, output, remaining, request_id, bulk)
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

        Deltas arrive as the model produces them; the last has the finish reason and token counts (their
        timings and counts go to the request's telemetry record).
        Until the first delta, an unavailable or busy endpoint is retried on another; closing the
        iterator early (a client that went away) closes the stream, and Triton cancels the generation.
        A full queue on every endpoint is ``ResourceExhaustedError``.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("generate takes a prompt or messages, not both")
        model = model or self.models.generator
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
        timing = generation(model)
        async with contextlib.aclosing(self._attempt_endpoints(model, deadline, attempts)) as endpoints:
            async for endpoint, _ in endpoints:
                async with contextlib.aclosing(self._stream(endpoint, model, inputs, deadline, request_id)) as stream:
                    try:
                        first = await anext(stream)
                    except _RetryableError as exc:
                        attempts.last = f"{endpoint.url}: {exc}"
                        continue
                    yield timing.delta(first)
                    async for delta in stream:
                        yield timing.delta(delta)
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

    async def _attempt(
        self,
        endpoint: Endpoint,
        model: str,
        inputs: list[Any],
        output: str,
        remaining: float,
        request_id: str,
        bulk: bool,
    ) -> Floats:
        """One request to one endpoint; raises ``_RetryableError`` for what another attempt may fix.

        The request first waits for a lane of its kind on the endpoint (within the call's deadline), so our
        own work never queues long inside Triton; its attempt's timeout starts when it is sent. Interactive
        requests have lanes of their own, and the higher priority in Triton's queue.
        """
        served = endpoint.models.get(model)
        if served is None:
            raise _RetryableError(f"{endpoint.url} no longer serves '{model}'")
        endpoint.outstanding += 1
        lanes, started = served.lanes(bulk), self._clock()
        try:
            try:
                async with asyncio.timeout(remaining):
                    await lanes.acquire()
            except TimeoutError:
                raise _RetryableError(f"no lane of {endpoint.url} came free in time") from None
            try:
                remaining -= self._clock() - started
                result = await self._send(endpoint, model, inputs, remaining, request_id, bulk)
            finally:
                lanes.release()
        finally:
            endpoint.outstanding -= 1
        values: Floats = np.asarray(result.as_numpy(output), dtype=np.float32)
        return values

    async def _send(
        self, endpoint: Endpoint, model: str, inputs: list[Any], remaining: float, request_id: str, bulk: bool
    ) -> Any:
        """The request itself, its outcome recorded on the endpoint's breaker."""
        timeout = max(0.001, min(self.settings.attempt_timeout_s, remaining))
        endpoint.breaker.acquire()
        try:
            result = await endpoint.client.infer(
                model,
                inputs,
                request_id=request_id,
                headers={REQUEST_ID_HEADER: request_id},
                client_timeout=timeout,
                priority=Priority.BULK if bulk else Priority.INTERACTIVE,
            )
        except InferenceServerException as exc:  # every RPC failure, a refused connection included
            raise self._failed(endpoint, model, exc) from exc
        except BaseException:  # cancelled: says nothing about the endpoint
            endpoint.breaker.release()
            raise
        endpoint.breaker.record_success()
        return result

    @staticmethod
    def _failed(endpoint: Endpoint, model: str, exc: InferenceServerException) -> TritonRagError | _RetryableError:
        """Record the outcome on the endpoint and say what the caller should raise.

        A request that ran out of time tells nothing sure about the endpoint (it may have been our own
        work that kept it busy): the breaker is left to the health probes and to real errors.
        """
        status, message = _status(exc), str(exc.message())
        if status == "INVALID_ARGUMENT":
            endpoint.breaker.record_success()  # the server is fine; the input is not
            return InvalidArgumentError(message)
        if status == "NOT_FOUND":  # unloaded since the last probe: route around it until the next one
            endpoint.breaker.record_success()
            endpoint.models.pop(model, None)
            return _RetryableError(message)
        if status == "DEADLINE_EXCEEDED":
            endpoint.breaker.release()
            return _RetryableError(message)
        endpoint.breaker.record_failure()
        if status == "UNAVAILABLE":
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


def _estimated_tokens(text: str) -> int:
    """An upper estimate of the tokens of ``text`` without its tokenizer: a subword tokenizer makes at most
    about one token per 3 bytes of UTF-8 on prose and code (CJK: one per character, 3 bytes), plus the
    special tokens around a row."""
    return len(text.encode("utf-8")) // 3 + 2


def work_slices(tokens: Sequence[int], max_rows: int, max_tokens: int | None) -> list[slice]:
    """Consecutive rows cut into requests of at most ``max_rows`` rows and ``max_tokens`` estimated tokens
    (a row over the budget goes alone)."""
    slices: list[slice] = []
    start, total = 0, 0
    for index, count in enumerate(tokens):
        full = index - start >= max_rows or (max_tokens is not None and total + count > max_tokens)
        if index > start and full:
            slices.append(slice(start, index))
            start, total = index, 0
        total += count
    if tokens:
        slices.append(slice(start, len(tokens)))
    return slices

"""``GenerationStreams``: streamed generations from the generator in Triton (a decoupled model), with retries
until the first token, and Triton's cancellation when the caller leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonrag.clients.wire.schema import REQUEST_ID_HEADER, ChatMessage, FinishReason, GenerationDelta, SamplingParams
from tritonrag.export.runtime.contract import (
    BUSY_ERROR,
    INPUT_ERROR,
    GeneratorTensors,
)
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tritonrag.server.telemetry.record import generation

from .endpoints import Attempts, Endpoint, EndpointSet, RetryableError

log = logging.getLogger(__name__)


class GenerationStreams(EndpointSet):
    """Generation calls over an ``EndpointSet``."""

    async def generate(
        self,
        params: SamplingParams,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        deadline_s: float | None = None,
        request_id: str | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> AsyncGenerator[GenerationDelta]:
        """Stream a generation from ``model`` (default: the generator) for ``prompt`` (raw text) or ``messages``,
        on ``version``, or the one the routes choose (a canary version that fails before its first delta is
        replaced by the stable version).

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
        attempts = Attempts()
        timing = generation(model)
        for chosen in self.versions_to_try(model, version):
            version_attempts = Attempts()
            async with contextlib.aclosing(self.attempt_endpoints(model, deadline, version_attempts, chosen)) as tries:
                async for endpoint, _ in tries:
                    started = self._clock()
                    stream = self._stream(endpoint, model, chosen, inputs, deadline, request_id)
                    async with contextlib.aclosing(stream):
                        try:
                            first = await anext(stream)
                        except RetryableError as exc:
                            version_attempts.last = f"{endpoint.url}: {exc}"
                            continue
                        self.version_stats.record(model, chosen, self._clock() - started)
                        yield timing.delta(first)
                        async for delta in stream:
                            yield timing.delta(delta)
                        return
            attempts.made += version_attempts.made
            attempts.last = version_attempts.last
        if BUSY_ERROR in attempts.last:
            raise ResourceExhaustedError(f"every generator is busy; retry later ({attempts.last})")
        raise UnavailableError(f"no Triton endpoint can serve '{model}' now ({attempts.last})")

    async def _stream(
        self, endpoint: Endpoint, model: str, version: str, inputs: list[Any], deadline: float, request_id: str
    ) -> AsyncGenerator[GenerationDelta]:
        """One generation on one endpoint; ``RetryableError`` before the first delta for what another may fix."""
        done = asyncio.Event()

        async def request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "model_version": version, "inputs": inputs, "request_id": request_id}
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
                    raise self._stream_failed(endpoint, model, version, str(error.message()), started)
                delta = _delta(result)
                if not started:
                    endpoint.breaker.record_success()
                    started = True
                ended = delta.finish_reason is not None
                yield delta
                if ended:
                    return
            raise self._stream_failed(endpoint, model, version, "the stream ended before the generation did", started)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                endpoint.breaker.release()
                raise DeadlineExceededError(f"'{model}' did not finish within the deadline") from exc
            message = f"[{exc.code().name}] {exc.details()}"
            raise self._stream_failed(endpoint, model, version, message, started) from exc
        finally:
            done.set()  # ends the request side of the stream
            if not ended or not await _drained(responses):
                responses.cancel()  # the caller left mid-generation: Triton cancels the request
            endpoint.outstanding -= 1
            if not started:
                endpoint.breaker.release()

    def _stream_failed(self, endpoint: Endpoint, model: str, version: str, message: str, started: bool) -> Exception:
        """What a failed generation stream raises: the model's own input and busy errors keep their meaning.

        Before the first delta, a transport failure counts on the endpoint's breaker; an error the model version
        answered with counts in the version's stats (the canary's judgement), and either is retried.
        """
        if message.startswith(INPUT_ERROR):
            endpoint.breaker.record_success()  # the server is fine; the input is not
            return InvalidArgumentError(message.removeprefix(INPUT_ERROR))
        if message.startswith(BUSY_ERROR) and not started:
            return RetryableError(message)  # busy, not broken: the breaker is only released
        if "unknown model" in message and not started:  # unloaded since the last probe
            endpoint.forget(model, version)
            return RetryableError(message)
        self.version_stats.record(model, version, 0.0, message)
        if not started:
            if message.startswith("[UNAVAILABLE]") or message.startswith("the stream ended"):
                endpoint.breaker.record_failure()
            return RetryableError(message)
        return UnavailableError(f"'{model}' version {version} failed on {endpoint.url} mid-generation: {message}")


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

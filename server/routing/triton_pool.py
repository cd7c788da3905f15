"""``TritonPool``: the only door to Triton: embeddings, reranking scores and generation streams, with retries.

Requests go over ``tritonclient.grpc.aio`` to the endpoints of an ``EndpointSet`` (endpoints.py), each
to the routable endpoint with the fewest requests outstanding. Transient failures (UNAVAILABLE, a
broken connection, one attempt's timeout) are retried on another endpoint when there is one, after a
jittered exponential backoff, as long as the call's deadline allows. Triton's INVALID_ARGUMENT is
never retried. Every call goes to one model version, pinned by the caller or chosen by the routes
(versions.py); a call whose chosen canary version fails is answered by the stable version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonrag.clients.wire.schema import REQUEST_ID_HEADER
from tritonrag.export.runtime.contract import (
    BULK_REQUEST_PARAMETER,
    EmbedderTensors,
    Priority,
    RerankerTensors,
)
from tritonrag.server.config import Settings
from tritonrag.server.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    TritonRagError,
    UnavailableError,
)

from .endpoints import Attempts, Endpoint, RetryableError
from .generation import GenerationStreams

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "").removeprefix("StatusCode.")


class TritonPool(GenerationStreams):
    """The inference calls of the orchestrator: embeddings and scores here, generations from ``GenerationStreams``."""

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
        version: str | None = None,
    ) -> Floats:
        """L2-normalised embeddings, float32 ``[len(texts), dim]``, in the order of ``texts``, all from one
        embedder version: ``version``, or the route's choice.

        ``bulk`` (ingestion) work waits for the endpoints' bulk lanes and yields to interactive work.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        model = self.models.embedder

        def inputs(rows: slice) -> list[Any]:
            return [_bytes_input(EmbedderTensors.TEXT, texts[rows])]

        tokens = [_estimated_tokens(text) for text in texts]
        output = EmbedderTensors.EMBEDDING
        return await self._infer_rows(model, version, tokens, inputs, output, deadline_s, request_id, bulk)

    async def rerank(
        self,
        query: str,
        passages: Sequence[str],
        deadline_s: float | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> Floats:
        """Relevance of each passage to ``query``, float32 ``[len(passages)]``; higher is better. From reranker
        ``version``, or the route's choice."""
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
        score = RerankerTensors.SCORE
        scores = await self._infer_rows(model, version, tokens, inputs, score, deadline_s, request_id, False)
        return scores.reshape(-1)

    async def _infer_rows(
        self,
        model: str,
        version: str | None,
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
        for bulk work it grows with the number of requests each bulk lane has to carry. Every row goes to one
        version (``version``, or the route's choice; on its failure, the stable version: ``versions_to_try``).
        """
        request_id = request_id or uuid.uuid4().hex
        failure: UnavailableError | None = None
        for chosen in self.versions_to_try(model, version):
            if failure is not None:
                log.warning("request %s to '%s' failed; trying version %s: %s", request_id, model, chosen, failure)
            try:
                return await self._infer_version(model, chosen, tokens, inputs, output, deadline_s, request_id, bulk)
            except UnavailableError as exc:
                failure = exc
        raise failure or UnavailableError(f"no Triton endpoint can serve '{model}' now")

    async def _infer_version(
        self,
        model: str,
        version: str,
        tokens: Sequence[int],
        inputs: Callable[[slice], list[Any]],
        output: str,
        deadline_s: float | None,
        request_id: str,
        bulk: bool,
    ) -> Floats:
        """``_infer_rows`` on one version."""
        served = self._served(model, version)
        if not served:
            raise UnavailableError(f"no Triton endpoint can serve '{model}' version {version} now")
        budgets = [m.max_request_tokens for m in served if m.max_request_tokens is not None]
        slices = work_slices(tokens, min(m.max_batch_rows for m in served), min(budgets) if budgets else None)
        if deadline_s is None:
            deadline_s = self.settings.request_timeout_s
            if bulk:
                rounds = -(-len(slices) // sum(m.bulk_capacity for m in served))
                deadline_s += rounds * self.settings.attempt_timeout_s
        deadline = self._clock() + deadline_s
        calls = [self._infer(model, version, inputs(s), output, deadline, request_id, bulk) for s in slices]
        parts = await _gather_first_error(calls)
        return np.concatenate(parts).astype(np.float32, copy=False)

    async def _infer(
        self, model: str, version: str, inputs: list[Any], output: str, deadline: float, request_id: str, bulk: bool
    ) -> Floats:
        """One request, retried on transient failures while attempts and the deadline allow."""
        attempts = Attempts()
        async with contextlib.aclosing(self.attempt_endpoints(model, deadline, attempts, version)) as endpoints:
            async for endpoint, remaining in endpoints:
                try:
                    return await self._attempt(endpoint, model, version, inputs, output, remaining, request_id, bulk)
                except RetryableError as exc:
                    attempts.last = f"{endpoint.url}: {exc}"
                    log.info("request %s to %s failed, attempt %d: %s", request_id, endpoint.url, attempts.made, exc)
        if attempts.made < self.settings.max_attempts:
            raise UnavailableError(f"no Triton endpoint can serve '{model}' now ({attempts.last})")
        if deadline <= self._clock():
            raise DeadlineExceededError(f"'{model}' did not answer within the deadline ({attempts.last})")
        raise UnavailableError(f"'{model}' failed after {self.settings.max_attempts} attempts ({attempts.last})")

    async def _attempt(
        self,
        endpoint: Endpoint,
        model: str,
        version: str,
        inputs: list[Any],
        output: str,
        remaining: float,
        request_id: str,
        bulk: bool,
    ) -> Floats:
        """One request to one endpoint; raises ``RetryableError`` for what another attempt may fix.

        The request first waits for a lane of its kind on the endpoint (within the call's deadline), so our
        own work never queues long inside Triton; its attempt's timeout starts when it is sent. Interactive
        requests have lanes of their own, and the higher priority in Triton's queue.
        """
        served = endpoint.models.get(model)
        if served is None or version not in served.versions:
            raise RetryableError(f"{endpoint.url} no longer serves '{model}' version {version}")
        endpoint.outstanding += 1
        lanes, started = served.lanes(bulk), self._clock()
        try:
            try:
                async with asyncio.timeout(remaining):
                    await lanes.acquire()
            except TimeoutError:
                raise RetryableError(f"no lane of {endpoint.url} came free in time") from None
            try:
                remaining -= self._clock() - started
                result = await self._send(endpoint, model, version, inputs, remaining, request_id, bulk)
            finally:
                lanes.release()
        finally:
            endpoint.outstanding -= 1
        values: Floats = np.asarray(result.as_numpy(output), dtype=np.float32)
        return values

    async def _send(
        self,
        endpoint: Endpoint,
        model: str,
        version: str,
        inputs: list[Any],
        remaining: float,
        request_id: str,
        bulk: bool,
    ) -> Any:
        """The request itself, its outcome recorded on the endpoint's breaker and in the version's stats."""
        timeout = max(0.001, min(self.settings.attempt_timeout_s, remaining))
        endpoint.breaker.acquire()
        started = self._clock()
        try:
            result = await endpoint.client.infer(
                model,
                inputs,
                version,
                request_id=request_id,
                headers={REQUEST_ID_HEADER: request_id},
                client_timeout=timeout,
                priority=Priority.BULK if bulk else Priority.INTERACTIVE,
                parameters={BULK_REQUEST_PARAMETER: True} if bulk else None,
            )
        except InferenceServerException as exc:  # every RPC failure, a refused connection included
            raise self._failed(endpoint, model, version, exc) from exc
        except BaseException:  # cancelled: says nothing about the endpoint
            endpoint.breaker.release()
            raise
        endpoint.breaker.record_success()
        self.version_stats.record(model, version, self._clock() - started)
        return result

    def _failed(
        self, endpoint: Endpoint, model: str, version: str, exc: InferenceServerException
    ) -> TritonRagError | RetryableError:
        """Record the outcome on the endpoint or the version, and say what the caller should raise.

        A request that ran out of time tells nothing sure about the endpoint (it may have been our own
        work that kept it busy): the breaker is left to the health probes and to real errors. An error the
        model version itself answered with (INTERNAL, a runtime that raised) is the version's: it counts
        in the version's stats, which the canary judges, not on the endpoint's breaker, so that a broken
        new version cannot take the endpoint away from the versions that work.
        """
        status, message = _status(exc), str(exc.message())
        if status == "INVALID_ARGUMENT":
            endpoint.breaker.record_success()  # the server is fine; the input is not
            return InvalidArgumentError(message)
        # Unloaded since the last probe (Triton says UNAVAILABLE "Request for unknown model" for a version it does
        # not have): route around the version on this endpoint until the next probe.
        if status == "NOT_FOUND" or (status == "UNAVAILABLE" and "unknown model" in message):
            endpoint.breaker.record_success()
            endpoint.forget(model, version)
            return RetryableError(message)
        if status == "DEADLINE_EXCEEDED":
            endpoint.breaker.release()
            return RetryableError(message)
        if status == "UNAVAILABLE":
            endpoint.breaker.record_failure()
            return RetryableError(message)
        endpoint.breaker.release()
        self.version_stats.record(model, version, 0.0, f"[{status}] {message}")
        return UnavailableError(f"'{model}' version {version} failed on {endpoint.url}: [{status}] {message}")


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

"""``EndpointSet``: the Triton endpoints the pool routes to, what each serves, and which can take a request.

Every endpoint is probed at start and then every ``probe_interval_s``: server liveness, then the
ready versions of each configured model (its repository index) and its batch size. An endpoint is routable for a model
(version) when it and the model (version) were ready at the last probe and its circuit breaker lets
requests through; the pool sends each request to the routable endpoint with the fewest requests
outstanding. Which version an unpinned request goes to is ``routes``' choice (versions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tritonrag.clients.wire.schema import ModelVersion
from tritonrag.export.runtime.contract import Parameters
from tritonrag.server.config import ModelSettings, RoutingSettings
from tritonrag.server.errors import DeadlineExceededError, UnavailableError

from .resilience import BreakerState, CircuitBreaker, backoff_delay
from .versions import VersionRoutes, VersionStats

log = logging.getLogger(__name__)


class TritonClient(Protocol):
    """What the pool uses of ``tritonclient.grpc.aio.InferenceServerClient``."""

    async def is_server_live(self, *, client_timeout: float | None = None) -> bool: ...

    async def get_model_config(
        self, model_name: str, model_version: str, *, client_timeout: float | None = None
    ) -> Any: ...

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
    ) -> Any: ...

    def stream_infer(
        self, inputs_iterator: AsyncIterator[dict[str, Any]], stream_timeout: float | None, headers: dict[str, str]
    ) -> Any: ...

    async def load_model(
        self, model_name: str, *, config: str | None = None, client_timeout: float | None = None
    ) -> None: ...

    async def get_model_repository_index(self, *, client_timeout: float | None = None) -> Any: ...

    async def close(self) -> None: ...


def grpc_client(url: str) -> TritonClient:
    """A real asyncio gRPC client to the Triton server at ``url`` (``host:port``)."""
    client: TritonClient = aioclient.InferenceServerClient(url)
    return client


@dataclass
class ServedModel:
    """A model as one endpoint serves it, read from its config: how large a request may be, and how many
    requests of each kind the endpoint gets at once (its lanes).

    Interactive work gets one lane per instance and one more waiting, so that no instance idles between
    two requests and no request of ours waits long inside Triton behind our own work (its attempt's
    timeout runs from when it is sent). Bulk work gets one lane per instance but one: the last instance
    stays free for interactive work, which Triton hands to it at once, where a priority level only
    reorders the queue and a search's query would still wait for the bulk batches that every instance
    is running (seconds during an ingest, docs/BENCHMARKS.md). A model of one instance shares it."""

    version: str  # the newest ready version
    max_batch_rows: int
    max_request_tokens: int | None = None  # the config's max_request_tokens parameter: estimated tokens per request
    instances: int = 1
    versions: tuple[str, ...] = ()  # every ready version, ascending; () means ``(version,)``
    interactive_lanes: asyncio.Semaphore = field(init=False, compare=False)
    bulk_lanes: asyncio.Semaphore = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.versions = self.versions or (self.version,)
        self.interactive_lanes = asyncio.Semaphore(self.instances + 1)
        self.bulk_lanes = asyncio.Semaphore(self.bulk_capacity)

    @property
    def bulk_capacity(self) -> int:
        """How many bulk requests the endpoint gets at once."""
        return max(1, self.instances - 1)

    def lanes(self, bulk: bool) -> asyncio.Semaphore:
        """The lanes of one kind of work."""
        return self.bulk_lanes if bulk else self.interactive_lanes

    @classmethod
    def from_config(cls, versions: tuple[str, ...], config: Any) -> ServedModel:
        """What the pool uses of a model's ``ModelConfig`` (``get_model_config(...).config``), with its ready
        ``versions`` (ascending)."""
        parameter = getattr(config, "parameters", {}).get(Parameters.MAX_REQUEST_TOKENS)
        tokens = int(parameter.string_value) if parameter is not None and parameter.string_value else None
        instances = sum(int(group.count) or 1 for group in getattr(config, "instance_group", [])) or 1
        return cls(versions[-1], max(1, int(config.max_batch_size)), tokens, instances, versions)


@dataclass
class Endpoint:
    """One Triton server and what the pool knows about it."""

    url: str
    client: TritonClient
    breaker: CircuitBreaker
    outstanding: int = 0
    ready: bool = False
    models: dict[str, ServedModel] = field(default_factory=dict)

    def forget(self, model: str, version: str) -> None:
        """Stop routing ``model`` ``version`` here until the next probe says it is ready."""
        served = self.models.get(model)
        if served is not None:
            served.versions = tuple(v for v in served.versions if v != version)
            if not served.versions:
                del self.models[model]

    def routable(self, model: str, version: str | None = None) -> bool:
        """Whether a request for ``model`` (``version``, when given) may go here now."""
        served = self.models.get(model)
        if not self.ready or served is None or not self.breaker.available():
            return False
        return version is None or version in served.versions


@dataclass(frozen=True)
class EndpointStatus:
    """A snapshot of one endpoint, for readiness reports and tests."""

    url: str
    ready: bool
    breaker: BreakerState
    outstanding: int
    models: dict[str, str]  # model -> newest ready version
    breaker_openings: int  # times the breaker opened since the pool started


class RetryableError(Exception):
    """An attempt failed in a way another attempt may not."""


@dataclass
class Attempts:
    """How one call's attempts went: how many were made, and the last failure."""

    made: int = 0
    last: str = "no attempt was made"


class EndpointSet:
    """Clients to several Triton endpoints, their health probes and breakers, and the choice of one per attempt."""

    def __init__(
        self,
        urls: Sequence[str],
        settings: RoutingSettings,
        models: ModelSettings | None = None,
        client_factory: Callable[[str], TritonClient] = grpc_client,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a Triton pool needs at least one endpoint")
        self.settings = settings
        self._client_factory = client_factory
        self._clock = clock
        self._rng = rng or random.Random()
        self._urls = list(dict.fromkeys(urls))
        self.models = models or ModelSettings()
        self._endpoints: list[Endpoint] = []
        self.routes = VersionRoutes(self._rng)
        self.version_stats = VersionStats(clock)
        self._probe_task: asyncio.Task[None] | None = None

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

    async def __aenter__(self) -> Self:
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
        """Read the endpoint's readiness and models.

        A failed probe counts as a failure of the endpoint on its breaker. An endpoint that cannot be
        reached is out of the rotation at once; one that answers too late (a busy machine) keeps what
        the last good probe found until its breaker opens (``breaker_failures`` in a row). A good probe
        ends a run of failures, and is the trial that closes a half-open breaker.
        """
        timeout = self.settings.probe_timeout_s
        models: dict[str, ServedModel] = {}
        try:
            # Liveness, not readiness: Triton reports itself not ready while any model (re)loads, and a roll-out
            # loads a version beside those that keep serving; which versions serve comes from the index.
            ready = bool(await endpoint.client.is_server_live(client_timeout=timeout))
            for name, versions in (await self._ready_versions(endpoint, timeout) if ready else {}).items():
                models[name] = await self._served_model(endpoint, name, versions, timeout)
        except Exception as exc:  # a probe must survive anything the endpoint does
            if endpoint.ready:
                log.warning("Triton endpoint %s failed its health probe: %s", endpoint.url, exc)
            endpoint.breaker.record_failure()
            if not _timed_out(exc):
                endpoint.ready, endpoint.models = False, {}
            return
        if endpoint.breaker.state() is not BreakerState.open:
            endpoint.breaker.record_success()
        if ready and not endpoint.ready:
            log.info("Triton endpoint %s is ready (models: %s)", endpoint.url, ", ".join(models) or "none")
        endpoint.ready, endpoint.models = ready, models

    async def _ready_versions(self, endpoint: Endpoint, timeout: float) -> dict[str, tuple[str, ...]]:
        """The READY versions of each configured model, from the endpoint's repository index: per version, so that
        a version loading or unloading beside the others (a roll-out) takes none of them out of the rotation."""
        index = await endpoint.client.get_model_repository_index(client_timeout=timeout)
        wanted = set(self.models.names())
        ready: dict[str, set[str]] = {}
        for entry in index.models:
            if entry.name in wanted and entry.state == "READY" and entry.version:
                ready.setdefault(entry.name, set()).add(str(entry.version))
        return {name: tuple(sorted(versions, key=int)) for name, versions in ready.items()}

    async def _served_model(
        self, endpoint: Endpoint, name: str, versions: tuple[str, ...], timeout: float
    ) -> ServedModel:
        known = endpoint.models.get(name)
        if known is not None and known.versions == versions:
            return known
        config = await endpoint.client.get_model_config(name, versions[-1], client_timeout=timeout)
        return ServedModel.from_config(versions, config.config)

    async def ready(self, model: str | None = None) -> bool:
        """Whether some endpoint can take requests now (for ``model``, when given)."""
        if model is None:
            return any(e.ready and e.breaker.available() for e in self._endpoints)
        return any(e.routable(model) for e in self._endpoints)

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint (its client, for the rollout controller's repository calls)."""
        return list(self._endpoints)

    def ready_versions(self, name: str) -> dict[str, tuple[str, ...]]:
        """Per endpoint URL, the versions of ``name`` ready at the last probe (``()`` when none or unreachable)."""
        return {e.url: (e.models[name].versions if e.ready and name in e.models else ()) for e in self._endpoints}

    def status(self) -> list[EndpointStatus]:
        """Every endpoint's state."""
        return [
            EndpointStatus(
                e.url,
                e.ready,
                e.breaker.state(),
                e.outstanding,
                {name: m.version for name, m in e.models.items()},
                e.breaker.openings,
            )
            for e in self._endpoints
        ]

    async def model_version(self, name: str) -> ModelVersion:
        """The version of ``name`` new work goes to: the route's primary version, or without a route the newest
        version the routable endpoints serve; ``UnavailableError`` when no endpoint serves it ready."""
        version = self.routes.primary(name)
        if not self._served(name, version):  # e.g. loaded since the last probe
            await self.probe()
        served = self._served(name, version)
        if not served:
            which = f"version {version} of '{name}'" if version else f"a ready '{name}'"
            raise UnavailableError(f"no Triton endpoint serves {which}")
        return ModelVersion(name=name, version=version or max((m.version for m in served), key=int))

    def _served(self, name: str, version: str | None = None) -> list[ServedModel]:
        return [e.models[name] for e in self._endpoints if e.routable(name, version)]

    def _resolve_versions(self, model: str, pinned: str | None) -> list[str]:
        """``[pinned]``, or the route's candidates (a canary's failure is answered by the stable version), or the
        newest version served ready."""
        if pinned is not None:
            return [pinned]
        versions = [v for v in self.routes.candidates(model) if v is not None]
        if versions:
            return versions
        served = self._served(model)
        return [max((m.version for m in served), key=int)] if served else []

    def versions_to_try(self, model: str, pinned: str | None) -> Iterator[str]:
        """The versions one call tries in turn, each after the one before failed: ``pinned``; or the route's
        candidates and then, once, any version the route moved to meanwhile (a call that chose the version a
        roll-out was switching away from goes to the new one)."""
        tried: list[str] = []
        for _ in range(1 if pinned is not None else 2):
            for version in self._resolve_versions(model, pinned):
                if version not in tried:
                    tried.append(version)
                    yield version

    # Inference

    async def attempt_endpoints(
        self, model: str, deadline: float, attempts: Attempts, version: str | None = None
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
            endpoint = self._pick(model, tried, version)
            if endpoint is None:
                return
            tried.append(endpoint)
            attempts.made += 1
            yield endpoint, remaining

    def _pick(self, model: str, tried: Sequence[Endpoint], version: str | None = None) -> Endpoint | None:
        """The routable endpoint with the fewest outstanding requests, preferring those not tried yet."""
        routable = [e for e in self._endpoints if e.routable(model, version)]
        candidates = [e for e in routable if e not in tried] or routable
        if not candidates:
            return None
        fewest = min(e.outstanding for e in candidates)
        return self._rng.choice([e for e in candidates if e.outstanding == fewest])


def _timed_out(exc: Exception) -> bool:
    """Whether a client call failed for want of an answer in time, not for want of a server."""
    status = exc.status() if isinstance(exc, InferenceServerException) else None
    return isinstance(exc, TimeoutError) or str(status or "").endswith("DEADLINE_EXCEEDED")

"""Which version of a model each request goes to, and how each version's requests went.

``VersionRoutes`` holds, per model, the traffic share of each version, set by the rollout controller
(server/lifecycle/): traffic moves by the orchestrator's routing (Triton's ``model_version`` on each
request), never by a reload in Triton. A model without a route goes to the newest version Triton
serves ready, as Triton itself would.

``VersionStats`` counts each version's requests, failures and latencies: the canary compares the new
version with the old from them, and Prometheus exports them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

VERSION_REQUESTS = Counter(
    "tritonrag_model_version_requests",
    "Requests the orchestrator sent to each Triton model version, by outcome (ok, error)",
    ["model", "version", "outcome"],
)
VERSION_SECONDS = Histogram(
    "tritonrag_model_version_request_duration_seconds",
    "Time of each successful request to a Triton model version (a generation: until its first delta)",
    ["model", "version"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@dataclass(frozen=True)
class Route:
    """Where a model's unpinned requests go: the ``stable`` version, and ``share`` of them (0..1) to ``canary``."""

    stable: str
    canary: str | None = None
    share: float = 0.0

    def shares(self) -> dict[str, float]:
        """Each version's share of the traffic."""
        if self.canary is None:
            return {self.stable: 1.0}
        return {self.stable: 1.0 - self.share, self.canary: self.share}


class VersionRoutes:
    """The route of each model; requests without a pinned version follow it."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._routes: dict[str, Route] = {}
        self._rng = rng or random.Random()

    def set(self, model: str, route: Route) -> None:
        """Route ``model``'s unpinned requests by ``route``."""
        if not 0.0 <= route.share <= 1.0:
            raise ValueError(f"a canary share is between 0 and 1, not {route.share}")
        self._routes[model] = route

    def clear(self, model: str) -> None:
        """Route ``model`` to the newest ready version again."""
        self._routes.pop(model, None)

    def get(self, model: str) -> Route | None:
        """``model``'s route; None: the newest ready version."""
        return self._routes.get(model)

    def primary(self, model: str) -> str | None:
        """The stable version (new work that must stay on one version, e.g. a collection's, starts on it)."""
        route = self._routes.get(model)
        return route.stable if route else None

    def candidates(self, model: str) -> list[str | None]:
        """The versions to try for one unpinned request, in order: the canary for its share of the requests,
        then the stable version (a failed canary request is answered by it). ``[None]`` without a route."""
        route = self._routes.get(model)
        if route is None:
            return [None]
        if route.canary is not None and self._rng.random() < route.share:
            return [route.canary, route.stable]
        return [route.stable]


@dataclass
class _Window:
    """One version's requests since the window began."""

    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    last_error: str = ""


@dataclass(frozen=True)
class VersionSummary:
    """A version's requests over a window: counts, error ratio and latency percentiles (seconds)."""

    requests: int
    errors: int
    p50_s: float | None
    p95_s: float | None
    last_error: str

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class VersionStats:
    """Per (model, version): requests, failures and latencies, in windows the canary restarts at each step,
    plus totals since start. Thread-safe (recorded from the event loop, read by the controller)."""

    MAX_LATENCIES = 10_000  # per window: enough for a p95, bounded memory

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._totals: dict[tuple[str, str], _Window] = {}
        self.clock = clock

    def record(self, model: str, version: str, seconds: float, error: str | None = None) -> None:
        """One request to ``model`` ``version``: its latency, or the error it failed with."""
        if not version:
            return
        VERSION_REQUESTS.labels(model, version, "error" if error else "ok").inc()
        if error is None:
            VERSION_SECONDS.labels(model, version).observe(seconds)
        with self._lock:
            for table in (self._windows, self._totals):
                window = table.setdefault((model, version), _Window())
                if error is None:
                    window.ok += 1
                    if len(window.latencies) < self.MAX_LATENCIES:
                        window.latencies.append(seconds)
                else:
                    window.errors += 1
                    window.last_error = error[:500]

    def restart(self, model: str) -> None:
        """Begin a new window for every version of ``model``."""
        with self._lock:
            for key in [key for key in self._windows if key[0] == model]:
                del self._windows[key]

    def window(self, model: str, version: str) -> VersionSummary:
        """The version's requests since the last ``restart`` of its model."""
        with self._lock:
            return _summary(self._windows.get((model, version), _Window()))

    def total(self, model: str, version: str) -> VersionSummary:
        """The version's requests since the orchestrator started."""
        with self._lock:
            return _summary(self._totals.get((model, version), _Window()))


def _summary(window: _Window) -> VersionSummary:
    latencies = sorted(window.latencies)

    def percentile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return VersionSummary(
        window.ok + window.errors, window.errors, percentile(0.5), percentile(0.95), window.last_error
    )

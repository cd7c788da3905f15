"""Load shedding: at most ``limits.<class>`` requests of each route class in flight, and at most
``limits.answer_per_tenant`` answers of one tenant; one more is refused at once.

A refused request gets ``ResourceExhaustedError`` with ``retry_after_s`` (429 with ``Retry-After`` over
HTTP, RESOURCE_EXHAUSTED with ``retry-after`` trailing metadata over gRPC) rather than a place in a
queue; a request admitted runs to its end, a stream to its last event. Both front-ends share one
``Admission`` (they run in one event loop), which also reports its counts to Prometheus at scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from fastapi import Depends
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import LimitsSettings
from ..errors import ResourceExhaustedError
from ..security.principal import current_principal
from ..security.ratelimit import RouteClass

__all__ = ["Admission", "RouteClass"]

# The classes with an in-flight limit; ``manage`` routes are light, and only rate-limited.
_SHED = (RouteClass.search, RouteClass.answer, RouteClass.ingest)


class Admission:
    """In-flight counts per route class (``search``, ``answer``, ``ingest``) and of answers per tenant against
    ``limits``; a Prometheus collector of them."""

    def __init__(self, limits: LimitsSettings) -> None:
        self._limits = {route_class: int(getattr(limits, route_class.value)) for route_class in _SHED}
        self._answer_per_tenant = limits.answer_per_tenant
        self._retry_after_s = limits.retry_after_s
        self._in_flight = dict.fromkeys(_SHED, 0)
        self._refused = dict.fromkeys(_SHED, 0)
        self._tenant_answers: Counter[str] = Counter()
        self._tenant_refused = 0

    @contextmanager
    def slot(self, route_class: RouteClass) -> Iterator[None]:
        """Hold one of the class's places for the block, and for ``answer`` one of the current principal's
        tenant's too; ``ResourceExhaustedError`` when none is free."""
        in_flight, limit = self._in_flight[route_class], self._limits[route_class]
        if in_flight >= limit:
            self._refused[route_class] += 1
            raise ResourceExhaustedError(
                f"{in_flight} {route_class} requests are in flight, the limit (limits.{route_class}); retry later",
                retry_after_s=self._retry_after_s,
            )
        with self._tenant_answer() if route_class is RouteClass.answer else nullcontext():
            self._in_flight[route_class] += 1
            try:
                yield
            finally:
                self._in_flight[route_class] -= 1

    @contextmanager
    def _tenant_answer(self) -> Iterator[None]:
        """Hold one of the answer places of the current principal's tenant (``limits.answer_per_tenant``)."""
        tenant = current_principal().tenant
        held = self._tenant_answers[tenant]
        if held >= self._answer_per_tenant:
            self._tenant_refused += 1
            raise ResourceExhaustedError(
                f"{held} answer requests of tenant {tenant!r} are in flight, the limit (limits.answer_per_tenant); "
                "retry later",
                retry_after_s=self._retry_after_s,
            )
        self._tenant_answers[tenant] += 1
        try:
            yield
        finally:
            self._tenant_answers[tenant] -= 1
            if not self._tenant_answers[tenant]:  # tenants come and go: hold only those with answers in flight
                del self._tenant_answers[tenant]

    def dependency(self, route_class: RouteClass) -> Any:
        """A FastAPI dependency that holds a place of ``route_class`` until the answer has been sent."""

        async def admitted() -> AsyncIterator[None]:
            with self.slot(route_class):
                yield

        return Depends(admitted, scope="request")

    def collect(self) -> Iterable[Metric]:
        labels = ["class"]
        in_flight = GaugeMetricFamily(
            "tritonrag_inflight_requests", "Requests in flight, by route class", labels=labels
        )
        limit = GaugeMetricFamily(
            "tritonrag_inflight_limit", "The most requests in flight, by route class", labels=labels
        )
        refused = CounterMetricFamily(
            "tritonrag_shed_requests", "Requests refused because their class was at its limit", labels=labels
        )
        for route_class in _SHED:
            in_flight.add_metric([route_class.value], self._in_flight[route_class])
            limit.add_metric([route_class.value], self._limits[route_class])
            refused.add_metric([route_class.value], self._refused[route_class])
        tenant_refused = CounterMetricFamily(
            "tritonrag_tenant_shed_requests",
            "Answer requests refused because their tenant was at limits.answer_per_tenant",
            value=self._tenant_refused,
        )
        return [in_flight, limit, refused, tenant_refused]

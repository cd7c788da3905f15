"""Load shedding: at most ``limits.<class>`` requests of each route class in flight; one more is refused at once.

A refused request gets ``ResourceExhaustedError`` with ``retry_after_s`` (429 with ``Retry-After`` over
HTTP, RESOURCE_EXHAUSTED with ``retry-after`` trailing metadata over gRPC) rather than a place in a
queue; a request admitted runs to its end, a stream to its last event. Both front-ends share one
``Admission`` (they run in one event loop), which also reports its counts to Prometheus at scrape time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from fastapi import Depends
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import LimitsSettings
from ..errors import ResourceExhaustedError


class RouteClass(StrEnum):
    """The kinds of work limited separately, each by the ``limits`` setting of its name."""

    search = "search"
    answer = "answer"
    ingest = "ingest"


class Admission:
    """In-flight counts per route class against ``limits``; a Prometheus collector of them."""

    def __init__(self, limits: LimitsSettings) -> None:
        self._limits = {route_class: int(getattr(limits, route_class.value)) for route_class in RouteClass}
        self._retry_after_s = limits.retry_after_s
        self._in_flight = dict.fromkeys(RouteClass, 0)
        self._refused = dict.fromkeys(RouteClass, 0)

    @contextmanager
    def slot(self, route_class: RouteClass) -> Iterator[None]:
        """Hold one of the class's places for the block; ``ResourceExhaustedError`` when none is free."""
        in_flight, limit = self._in_flight[route_class], self._limits[route_class]
        if in_flight >= limit:
            self._refused[route_class] += 1
            raise ResourceExhaustedError(
                f"{in_flight} {route_class} requests are in flight, the limit (limits.{route_class}); retry later",
                retry_after_s=self._retry_after_s,
            )
        self._in_flight[route_class] += 1
        try:
            yield
        finally:
            self._in_flight[route_class] -= 1

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
        for route_class in RouteClass:
            in_flight.add_metric([route_class.value], self._in_flight[route_class])
            limit.add_metric([route_class.value], self._limits[route_class])
            refused.add_metric([route_class.value], self._refused[route_class])
        return [in_flight, limit, refused]

"""Series read at scrape time from the state the orchestrator already keeps: Triton endpoints, collections, jobs.

Each collector reads its source when Prometheus scrapes (``/metrics`` runs them in a worker thread),
so nothing is updated on a request's path. ``registered`` adds them to the default registry for as
long as a stack runs.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tritonrag.clients.wire.schema import JobStatus

from ..retrieval.registry import CollectionRegistry
from ..routing.endpoints import EndpointStatus
from ..routing.resilience import BreakerState
from ..store.catalog import Catalog

log = logging.getLogger(__name__)

_UNFINISHED = (JobStatus.queued, JobStatus.running)


class EndpointCollector:
    """Each Triton endpoint's readiness, breaker, outstanding requests and served model versions."""

    def __init__(self, endpoints: Callable[[], Sequence[EndpointStatus]]) -> None:
        self._endpoints = endpoints  # HealthService.endpoints

    def collect(self) -> Iterable[Metric]:
        labels = ["endpoint"]
        up = GaugeMetricFamily(
            "tritonrag_triton_endpoint_up", "1 when the endpoint was ready at its last probe", labels=labels
        )
        breaker = GaugeMetricFamily(
            "tritonrag_triton_breaker_state",
            "1 for the state the endpoint's circuit breaker is in (closed, open, half_open), 0 for the others",
            labels=["endpoint", "state"],
        )
        openings = CounterMetricFamily(
            "tritonrag_triton_breaker_openings", "Times the endpoint's breaker opened since start", labels=labels
        )
        outstanding = GaugeMetricFamily(
            "tritonrag_triton_outstanding_requests",
            "Requests the orchestrator has in flight on the endpoint",
            labels=labels,
        )
        served = GaugeMetricFamily(
            "tritonrag_triton_model_version",
            "The version of each model the endpoint serves ready (absent: not served)",
            labels=["endpoint", "model"],
        )
        for status in self._endpoints():
            up.add_metric([status.url], float(status.ready))
            for state in BreakerState:
                breaker.add_metric([status.url, state.value], float(status.breaker is state))
            openings.add_metric([status.url], status.breaker_openings)
            outstanding.add_metric([status.url], status.outstanding)
            for model, version in status.models.items():
                served.add_metric([status.url, model], float(version))
        return [up, breaker, openings, outstanding, served]


class CollectionCollector:
    """Documents, chunks and bytes on disk of each collection opened since start (at its first use)."""

    def __init__(self, registry: CollectionRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        labels = ["collection"]
        documents = GaugeMetricFamily("tritonrag_collection_documents", "Documents in the collection", labels=labels)
        chunks = GaugeMetricFamily("tritonrag_collection_chunks", "Chunks in the collection", labels=labels)
        size = GaugeMetricFamily("tritonrag_collection_size_bytes", "The collection's files on disk", labels=labels)
        for collection in self._registry.opened():
            try:
                stats = collection.info()
            except (sqlite3.Error, OSError) as exc:  # deleted while this scrape ran
                log.debug("collection %s skipped in metrics: %s", collection.name, exc)
                continue
            documents.add_metric([collection.name], stats.documents)
            chunks.add_metric([collection.name], stats.chunks)
            size.add_metric([collection.name], stats.size_bytes)
        return [documents, chunks, size]


class JobCollector:
    """Ingestion jobs by status, and their documents: settled (done, failed) and pending."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def collect(self) -> Iterable[Metric]:
        totals = self._catalog.job_totals()
        jobs = GaugeMetricFamily("tritonrag_ingest_jobs", "Ingestion jobs in the catalog, by status", labels=["status"])
        settled = CounterMetricFamily(
            "tritonrag_ingest_documents",
            "Documents of all jobs upserted (done) or given up on (failed)",
            labels=["outcome"],
        )
        pending = GaugeMetricFamily(
            "tritonrag_ingest_documents_pending", "Documents of unfinished jobs not yet settled"
        )
        for status in JobStatus:
            jobs.add_metric([status.value], totals[status].jobs if status in totals else 0)
        settled.add_metric(["done"], sum(t.done for t in totals.values()))
        settled.add_metric(["failed"], sum(t.failed for t in totals.values()))
        pending.add_metric([], sum(t.documents - t.done - t.failed for s, t in totals.items() if s in _UNFINISHED))
        return [jobs, settled, pending]


@contextmanager
def registered(*collectors: Collector) -> Iterator[None]:
    """``collectors`` in the default registry for the block."""
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        yield
    finally:
        for collector in collectors:
            REGISTRY.unregister(collector)

"""The Grafana dashboard reads only series that exist: the orchestrator's (from its registry), the generator's
gauges on Triton, and the Triton series that tests/integration/test_triton_generator.py finds on a real Triton."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

import tritonrag.server.cache.metrics  # noqa: F401  # the cache's series, as the running orchestrator has them
from tests.fakes import FakeServices
from tests.promql import TRITON_SERIES, dashboard_expressions, metric_names
from tritonrag.export.runtime.contract import GeneratorMetrics
from tritonrag.server.api.admission import Admission
from tritonrag.server.config import ApiSettings, IndexSettings, LimitsSettings
from tritonrag.server.retrieval.registry import CollectionRegistry
from tritonrag.server.routing.endpoints import EndpointStatus
from tritonrag.server.routing.resilience import BreakerState
from tritonrag.server.store.catalog import Catalog
from tritonrag.server.telemetry.collectors import CollectionCollector, EndpointCollector, JobCollector, registered

GENERATOR_SERIES = {GeneratorMetrics.QUEUE_DEPTH, GeneratorMetrics.RUNNING, GeneratorMetrics.QUEUE_CAPACITY}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


async def _dimension() -> int:
    return 4


@pytest.fixture
def exported(tmp_path: Path) -> Iterator[set[str]]:
    """The sample names of the default registry, with every collector of a running stack registered, after a
    few requests through the HTTP API over the fakes."""
    catalog = Catalog(tmp_path / "catalog.sqlite")
    collections = CollectionRegistry(tmp_path, catalog, IndexSettings(), _dimension)
    status = EndpointStatus("127.0.0.1:8001", True, BreakerState.closed, 0, {"generator": "1"}, 0)
    admission = Admission(LimitsSettings())
    collectors = (
        EndpointCollector(lambda: [status]),
        CollectionCollector(collections),
        JobCollector(catalog),
        admission,
    )
    with registered(*collectors), TestClient(FakeServices.create().http_app(ApiSettings(), admission)) as client:
        client.post("/v1/collections", json={"name": "docs"})
        client.post("/v1/search", json={"collection": "docs", "query": "q"})
        yield {family.name + suffix for family in REGISTRY.collect() for suffix in _SUFFIXES.get(family.type, ("",))}
    catalog.close()


def test_every_dashboard_expression_names_only_exported_series(exported: set[str]) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    unknown = {
        expression: sorted(names - exported - TRITON_SERIES - GENERATOR_SERIES)
        for expression in expressions
        if (names := metric_names(expression)) - exported - TRITON_SERIES - GENERATOR_SERIES
    }
    assert unknown == {}
    assert all(metric_names(expression) for expression in expressions)


def test_the_parser_finds_metric_names_and_only_them() -> None:
    expression = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"/v1/x|y"}[$__rate_interval]))) '
        "/ on (route) group_left b_total > 1e6 and ignoring (x) c offset 5m"
    )
    assert metric_names(expression) == {"a_bucket", "b_total", "c"}

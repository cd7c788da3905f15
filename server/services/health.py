"""``HealthService``: whether each dependency of the orchestrator can serve (``/readyz``)."""

from __future__ import annotations

import asyncio

from ..routing.endpoints import EndpointStatus
from ..routing.triton_pool import TritonPool
from ..store.catalog import Catalog


class HealthService:
    """Readiness of Triton (some endpoint routable) and of the stores (the catalog opens)."""

    def __init__(self, pool: TritonPool, catalog: Catalog) -> None:
        self._pool = pool
        self._catalog = catalog

    async def readiness(self) -> dict[str, bool]:
        """``{"triton": ..., "stores": ...}``."""
        stores = await asyncio.to_thread(self._catalog.healthy)
        return {"triton": await self._pool.ready(), "stores": stores}

    def endpoints(self) -> list[EndpointStatus]:
        """Each Triton endpoint's state: readiness, breaker (and how often it opened), outstanding requests."""
        return self._pool.status()

"""Build the orchestrator's services from ``Settings`` and run both front-ends in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn

from .api.grpc_service import create_grpc_server
from .api.http import create_http_app
from .config import Settings
from .retrieval.registry import CollectionRegistry
from .retrieval.stages import SearchStages
from .routing.triton_pool import TritonPool
from .services.answers import AnswerService
from .services.collections import CollectionService
from .services.health import HealthService
from .services.models import ModelService
from .services.search import SearchService
from .store.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """Every service of the orchestrator, over one Triton pool and one catalog."""

    collections: CollectionService
    search: SearchService
    answers: AnswerService
    models: ModelService
    health: HealthService
    registry: CollectionRegistry

    @classmethod
    def build(cls, settings: Settings, pool: TritonPool, catalog: Catalog) -> Services:
        """The services, each given its own settings section; nothing is started."""
        stages = SearchStages.over(pool)
        models = ModelService(pool, settings.triton.repository, settings.models)
        registry = CollectionRegistry(settings.data_dir, catalog, settings.index, models.embedding_dimension)
        search = SearchService(registry, stages)
        jobs_dir = settings.data_dir / "jobs"
        return cls(
            collections=CollectionService(registry, models, stages.embedding, settings.ingest, jobs_dir),
            search=search,
            answers=AnswerService(search, models, pool, settings.query),
            models=models,
            health=HealthService(pool, catalog),
            registry=registry,
        )

    async def start(self) -> None:
        """Resume unfinished ingestion jobs."""
        await self.collections.start()

    async def close(self) -> None:
        """Stop the jobs and close every open collection (writing index snapshots)."""
        await self.collections.close()
        await self.registry.close()


@contextlib.asynccontextmanager
async def running_services(settings: Settings) -> AsyncIterator[Services]:
    """The services with their Triton pool, catalog and job runner started; all closed on exit."""
    catalog = Catalog(settings.data_dir / "catalog.sqlite")
    pool = TritonPool.from_settings(settings)
    await pool.start()
    services = Services.build(settings, pool, catalog)
    try:
        await services.start()
        yield services
    finally:
        await services.close()
        await pool.close()
        catalog.close()


async def serve(settings: Settings) -> None:
    """Serve HTTP and gRPC until cancelled (or until uvicorn is told to exit by a signal)."""
    async with running_services(settings) as services:
        api = settings.api
        grpc_server = create_grpc_server(services.collections, services.search, services.answers, api)
        await grpc_server.start()
        app = create_http_app(
            services.collections,
            services.search,
            services.answers,
            services.health,
            services.answers,
            services.models,
            api,
            settings.models,
        )
        config = uvicorn.Config(app, host=api.host, port=api.http_port, log_level="info", lifespan="off")
        http_server = uvicorn.Server(config)
        log.info("orchestrator: HTTP http://%s:%d, gRPC %s:%d", api.host, api.http_port, api.host, api.grpc_port)
        serving = asyncio.create_task(http_server.serve())
        try:
            await serving
        finally:
            http_server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await grpc_server.stop(grace=5)

"""Build the orchestrator's services from ``Settings`` and run both front-ends in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import grpc
import uvicorn
from fastapi import FastAPI
from prometheus_client import start_http_server

from .api.admission import Admission
from .api.auth import Guard
from .api.grpc_service import create_grpc_server
from .api.http import create_http_app
from .cache.embedding import CachedEmbedding
from .cache.keys import Keys
from .cache.levels import TwoLevelCache
from .cache.results import CachedAnswers, CachedSearch
from .config import Settings
from .ingest.celery_jobs import celery_app, dispatcher
from .lifecycle.controller import RolloutController
from .lifecycle.state import RolloutState
from .retrieval.registry import CollectionRegistry
from .retrieval.stages import SearchStages
from .routing.triton_pool import TritonPool
from .security.auth import Authenticator, prepare_keys
from .security.keys import KEYS_FILE, KeyStore
from .security.ratelimit import RateLimiter
from .security.tenancy import TenantAnswers, TenantChats, TenantCollections, TenantSearch
from .services.answers import AnswerService
from .services.collections import CollectionService
from .services.health import HealthService
from .services.models import ModelService
from .services.search import SearchService
from .store.catalog import Catalog
from .store.database import StoreLocation
from .telemetry.collectors import CollectionCollector, EndpointCollector, JobCollector, registered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """Every service of the orchestrator, over one Triton pool and one catalog."""

    collections: CollectionService
    search: CachedSearch
    answers: CachedAnswers
    models: ModelService
    health: HealthService
    registry: CollectionRegistry
    cache: TwoLevelCache
    key_store: KeyStore
    rollouts: RolloutController | None  # None: roll-outs off (rollout.enabled), Triton's own version policy

    @classmethod
    def build(
        cls, settings: Settings, pool: TritonPool, catalog: Catalog, key_store: KeyStore, worker: bool = False
    ) -> Services:
        """The services, each given its own settings section, and the cache in front of them; nothing is started.
        With ``ingest.broker_url`` jobs go to Celery workers. A ``worker``'s services run jobs and serve no searches:
        its registry neither opens every collection at start nor follows the store (a write catches a collection's
        indexes up first)."""
        models = ModelService(pool, settings.triton.repository, settings.models)
        registry = CollectionRegistry(
            settings.data_dir,
            catalog,
            settings.index,
            models.embedding_dimension,
            settings.store.follow_interval_s,
            follow=not worker,
        )
        cache = TwoLevelCache(settings.cache)
        keys = Keys(settings.cache.key_prefix, registry, models, settings.index, settings.query)
        stages = replace(SearchStages.over(pool), embedding=CachedEmbedding(pool, cache, keys, models))
        search = SearchService(registry, stages)
        legacy_jobs_dir = settings.data_dir / "jobs"
        dispatch = None
        if settings.ingest.broker_url and not worker:
            dispatch = dispatcher(celery_app(settings))
        collections = CollectionService(registry, models, stages.embedding, settings.ingest, legacy_jobs_dir, dispatch)
        rollouts = None
        if settings.rollout.enabled:
            state = RolloutState(settings.data_dir)
            repository = settings.triton.repository
            rollouts = RolloutController(pool, state, repository, settings.models, settings.rollout, collections)
        return cls(
            collections=collections,
            search=CachedSearch(search, cache, keys),
            answers=CachedAnswers(AnswerService(search, models, pool, settings.query), cache, keys),
            models=models,
            health=HealthService(pool, catalog),
            registry=registry,
            cache=cache,
            key_store=key_store,
            rollouts=rollouts,
        )

    def http_app(self, settings: Settings, admission: Admission, guard: Guard) -> FastAPI:
        """The HTTP API (native, OpenAI-compatible, cache and key admin) over these services, each client seeing
        its own tenant's collections."""
        return create_http_app(
            TenantCollections(self.collections),
            TenantSearch(self.search),
            TenantAnswers(self.answers),
            self.health,
            TenantChats(self.answers),
            self.models,
            settings.api,
            settings.models,
            admission,
            settings.telemetry,
            guard,
            self.cache,
            self.key_store,
            self.rollouts,
        )

    def grpc_server(self, settings: Settings, admission: Admission, guard: Guard) -> grpc.aio.Server:
        """The gRPC API over these services, each client seeing its own tenant's collections."""
        return create_grpc_server(
            TenantCollections(self.collections),
            TenantSearch(self.search),
            TenantAnswers(self.answers),
            settings.api,
            admission,
            settings.telemetry,
            guard,
        )

    async def start(self) -> None:
        """Over a shared store, open the collections and follow the store; resume unfinished ingestion jobs; restore
        the models' loaded versions and routes."""
        await self.registry.start()
        await self.collections.start()
        if self.rollouts is not None:
            await self.rollouts.start()

    async def close(self) -> None:
        """Stop the roll-outs and the jobs, close every open collection (writing index snapshots) and the cache's
        connections."""
        if self.rollouts is not None:
            await self.rollouts.close()
        await self.collections.close()
        await self.registry.close()
        await self.cache.close()


@contextlib.asynccontextmanager
async def running_services(settings: Settings, worker: bool = False) -> AsyncIterator[Services]:
    """The services with their Triton pool, catalog and job runner started; all closed on exit. ``worker``: see
    `Services.build`."""
    location = StoreLocation(settings.store.url)
    catalog = Catalog(settings.data_dir / "catalog.sqlite", location)
    key_store = KeyStore(settings.data_dir / KEYS_FILE, location)
    prepare_keys(key_store, settings.auth)
    pool = TritonPool.from_settings(settings)
    await pool.start()
    services = Services.build(settings, pool, catalog, key_store, worker)
    try:
        await services.start()
        yield services
    finally:
        await services.close()
        await pool.close()
        catalog.close()
        location.close()
        key_store.close()


def _collectors(
    services: Services, admission: Admission, limiter: RateLimiter
) -> contextlib.AbstractContextManager[None]:
    """The scrape-time series of this stack in the default registry: endpoints, collections, jobs, shedding,
    rate limits."""
    return registered(
        EndpointCollector(services.health.endpoints),
        CollectionCollector(services.registry),
        JobCollector(services.registry.catalog),
        admission,
        limiter,
    )


@contextlib.contextmanager
def _metrics_server(settings: Settings) -> Iterator[None]:
    """``/metrics`` on a port of its own, when ``telemetry.metrics_port`` sets one."""
    port = settings.telemetry.metrics_port
    if not settings.telemetry.metrics or port is None:
        yield
        return
    server, thread = start_http_server(port, addr=settings.api.host)
    log.info("orchestrator: metrics http://%s:%d/metrics", settings.api.host, port)
    try:
        yield
    finally:
        server.shutdown()
        thread.join()


async def serve(settings: Settings) -> None:
    """Serve HTTP and gRPC until cancelled (or until uvicorn is told to exit by a signal)."""
    async with running_services(settings) as services:
        api = settings.api
        admission = Admission(settings.limits)  # shared: the limits hold for both front-ends together
        limiter = RateLimiter(settings.rate_limits)
        guard = Guard(Authenticator(settings.auth, services.key_store), limiter)
        grpc_server = services.grpc_server(settings, admission, guard)
        await grpc_server.start()
        app = services.http_app(settings, admission, guard)
        # uvicorn logs through the root logger (logs.configure_logging); its access log is replaced by ours.
        config = uvicorn.Config(
            app,
            host=api.host,
            port=api.http_port,
            lifespan="off",
            log_config=None,
            access_log=False,
            ssl_certfile=api.tls_cert_file,
            ssl_keyfile=api.tls_key_file,
        )
        http_server = uvicorn.Server(config)
        log.info("orchestrator: HTTP http://%s:%d, gRPC %s:%d", api.host, api.http_port, api.host, api.grpc_port)
        with _collectors(services, admission, limiter), _metrics_server(settings):
            serving = asyncio.create_task(http_server.serve())
            try:
                await serving
            finally:
                http_server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                await grpc_server.stop(grace=5)
                await limiter.close()

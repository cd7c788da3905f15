"""Build the orchestrator from ``Settings`` and run both front-ends in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import uvicorn

from .api.grpc_service import create_grpc_server
from .api.http import create_http_app
from .config import Settings
from .pipeline import RagCore
from .routing.triton_pool import TritonPool
from .store.catalog import Catalog

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_core(settings: Settings) -> AsyncIterator[RagCore]:
    """The core with its Triton pool, catalog and job runner started; all closed on exit."""
    catalog = Catalog(settings.data_dir / "catalog.sqlite")
    pool = TritonPool.from_settings(settings)
    await pool.start()
    core = RagCore(
        settings.data_dir,
        settings.triton.repository,
        catalog,
        pool,
        settings.ingest,
        embedder_model=settings.routing.embedder_model,
        reranker_model=settings.routing.reranker_model,
        generator_model=settings.routing.generator_model,
        fallback_generator_model=settings.routing.fallback_generator_model,
        query=settings.query,
    )
    try:
        await core.start()
        yield core
    finally:
        await core.close()
        await pool.close()
        catalog.close()


async def serve(settings: Settings) -> None:
    """Serve HTTP and gRPC until cancelled (or until uvicorn is told to exit by a signal)."""
    async with running_core(settings) as core:
        api = settings.api
        grpc_server = create_grpc_server(core, api)
        await grpc_server.start()
        config = uvicorn.Config(
            create_http_app(core, api, settings.routing.generator_model, settings.routing.embedder_model),
            host=api.host,
            port=api.http_port,
            log_level="info",
            lifespan="off",
        )
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

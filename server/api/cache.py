"""The cache over HTTP: each request's cache scope, and the admin routes ``GET /v1/cache/stats`` and
``POST /v1/cache:flush``.

The scope (a dependency of the native and OpenAI-compatible routers): ``Cache-Control: no-cache`` makes
the request bypass the cache, and the level that served its result ("l1", "l2" or "miss") is left in
``request.state.cache`` for the access log (None: nothing cacheable, or bypassed).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.schema import CacheFlushed, CacheStats

from ..cache.scope import CacheScope, Level, open_scope
from .auth import Guard
from .errors import ERROR_RESPONSES
from .services import CacheAdmin

CACHE_CONTROL = "cache-control"  # the HTTP header, and the gRPC metadata key


def no_cache(cache_control: str | None) -> bool:
    """Whether a ``Cache-Control`` value asks for a fresh result."""
    return "no-cache" in {part.strip().lower() for part in (cache_control or "").split(",")}


async def cache_scope(request: Request) -> None:
    """Open the request's cache scope from its ``Cache-Control`` header."""

    def report(level: Level) -> None:
        request.state.cache = level

    open_scope(CacheScope(bypass=no_cache(request.headers.get(CACHE_CONTROL)), report=report))


CACHE_SCOPE = Depends(cache_scope)


def cache_router(cache: CacheAdmin, guard: Guard) -> APIRouter:
    """``GET /v1/cache/stats`` and ``POST /v1/cache:flush`` over ``cache``, for admins."""
    router = APIRouter(prefix="/v1", tags=["cache"], responses=ERROR_RESPONSES, dependencies=[guard(Scope.admin)])

    @router.get("/cache/stats")
    async def cache_stats() -> CacheStats:
        """Hits, misses and Redis errors per level and tier since the start; the in-process entries and bytes."""
        return cache.stats()

    @router.post("/cache:flush")
    async def flush_cache() -> CacheFlushed:
        """Empty this process's L1 and delete this stack's keys from Redis (other replicas keep their L1)."""
        return await cache.flush()

    return router

"""``GET /metrics`` on the API's HTTP port: Prometheus' default registry, behind its own bearer token when one is
set, else for admins (its labels name every tenant's collections)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException

from tritonrag.clients.wire.auth import Scope

from ..config import TelemetrySettings
from .auth import Guard


def metrics_router(settings: TelemetrySettings, guard: Guard) -> APIRouter:
    """``/metrics`` in Prometheus' text format; with ``settings.metrics_token``, only for ``Bearer <token>``,
    else for a caller with the ``admin`` scope."""
    expected = None if settings.metrics_token is None else f"Bearer {settings.metrics_token.get_secret_value()}"
    router = APIRouter(dependencies=[] if expected is not None else [guard(Scope.admin)])

    @router.get("/metrics", include_in_schema=False)
    async def metrics(authorization: Annotated[str, Header()] = "") -> Response:
        if expected is not None and not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "/metrics needs its bearer token", {"WWW-Authenticate": "Bearer"}
            )
        # The scrape-time collectors read SQLite and the disk: off the event loop.
        return Response(await asyncio.to_thread(generate_latest, REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router

"""``GET /metrics`` on the API's HTTP port: Prometheus' default registry, behind a bearer token when one is set."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException

from ..config import TelemetrySettings


def metrics_router(settings: TelemetrySettings) -> APIRouter:
    """``/metrics`` in Prometheus' text format; with ``settings.metrics_token``, only for ``Bearer <token>``."""
    router = APIRouter()
    expected = None if settings.metrics_token is None else f"Bearer {settings.metrics_token.get_secret_value()}"

    @router.get("/metrics", include_in_schema=False)
    async def metrics(authorization: Annotated[str, Header()] = "") -> Response:
        if expected is not None and not secrets.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "/metrics needs its bearer token", {"WWW-Authenticate": "Bearer"}
            )
        # The scrape-time collectors read SQLite and the disk: off the event loop.
        return Response(await asyncio.to_thread(generate_latest, REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router

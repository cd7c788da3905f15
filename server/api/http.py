"""The HTTP application: the native and OpenAI-compatible routes, health and OpenAPI, with their middleware.

Every answer carries the request's ``x-request-id`` (``request_id.RequestIds``); every error outside
the OpenAI-compatible routes is answered in the native shape (``errors.native_error_response``); a
body over ``ApiSettings.max_request_bytes`` is refused with 413 before anything parses it. Every
request is one telemetry record (``_Observed``): counted by its route template, logged on one line.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ApiSettings, ModelSettings, TelemetrySettings
from ..errors import PayloadTooLargeError, TritonRagError
from ..security.keys import KeyStore
from ..telemetry.observer import RequestTelemetry
from ..telemetry.record import UNMATCHED
from .admission import Admission
from .auth import Guard
from .cache import cache_router
from .errors import native_error_response
from .keys import keys_router
from .metrics import metrics_router
from .models import models_router
from .native import health_router, native_router
from .openai import openai_router
from .request_id import RequestIds
from .services import Answers, CacheAdmin, Chats, Collections, Models, Readiness, Rollouts, Search


def create_http_app(
    collections: Collections,
    search: Search,
    answers: Answers,
    readiness: Readiness,
    chats: Chats,
    models: Models,
    settings: ApiSettings,
    names: ModelSettings,
    admission: Admission,
    telemetry: TelemetrySettings,
    guard: Guard,
    cache: CacheAdmin | None = None,
    keys: KeyStore | None = None,
    rollouts: Rollouts | None = None,
) -> FastAPI:
    """The HTTP API: the native routes over ``collections``, ``search``, ``answers`` and ``readiness``; the
    OpenAI-compatible ones over ``chats`` and ``models``, for the models ``names`` names; every route but
    health admitted by ``guard``; requests limited by ``admission``; metrics and access lines as ``telemetry``
    says, with ``/metrics`` unless it has a port of its own; the cache's stats and flush over ``cache``, key
    management over ``keys`` and model roll-outs over ``rollouts`` when given."""
    app = _App(
        RequestTelemetry(telemetry),
        title="tritonrag",
        summary="Retrieval-augmented generation served by NVIDIA Triton",
        version=metadata.version("tritonrag"),
        generate_unique_id_function=_operation_id,
        redirect_slashes=False,  # a URL names one operation: /v1/collections/ is no collection's, not the list's
    )
    app.include_router(native_router(collections, search, answers, admission, guard))
    app.include_router(openai_router(chats, models, names, admission, guard))
    app.include_router(health_router(readiness))
    if cache is not None:
        app.include_router(cache_router(cache, guard))
    if keys is not None:
        app.include_router(keys_router(keys, guard))
    if rollouts is not None:
        app.include_router(models_router(rollouts, guard))
    if telemetry.metrics and telemetry.metrics_port is None:
        app.include_router(metrics_router(telemetry, guard))
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    for error_class in (TritonRagError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(error_class, native_error_response)
    return app


class _App(FastAPI):
    """FastAPI with ``RequestIds`` and ``_Observed`` outside all of its middleware, so that an error's answer
    carries the request id and is counted too, the 500 of a bug included (Starlette sends that one from its
    outermost middleware)."""

    def __init__(self, telemetry: RequestTelemetry, **kwargs: Any) -> None:
        self.telemetry = telemetry
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIds(_Observed(super().build_middleware_stack(), self.telemetry))


_NOSNIFF = (b"x-content-type-options", b"nosniff")


class _Observed:
    """Each HTTP request as one telemetry record: its route template (``unmatched`` for no route), method,
    status and duration to the end of its answer, and the cache level a handler left in
    ``request.state.cache``. Every answer gets ``X-Content-Type-Options: nosniff``."""

    def __init__(self, app: ASGIApp, telemetry: RequestTelemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        with self.telemetry.request("http", scope["method"], state.get("request_id")) as record:

            async def send_observed(message: Message) -> None:
                if message["type"] == "http.response.start":
                    record.status = str(message["status"])
                    # Answers are data (JSON, SSE): a browser must never sniff generated text into HTML.
                    message["headers"] = [*message.get("headers", []), _NOSNIFF]
                await send(message)

            try:
                await self.app(scope, receive, send_observed)
            finally:
                route = scope.get("route")  # set by the router on a match (or a match but for the method)
                record.route = route.path_format if isinstance(route, Route) else UNMATCHED
                record.cache = state.get("cache")


def _operation_id(route: APIRoute) -> str:
    """OpenAPI operation ids are the routes' names (``create_collection``), for generated clients."""
    return route.name


class _BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413 before anything parses it.

    A declared Content-Length is checked first; any body is counted as it streams in, and
    handed on once complete.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = PayloadTooLargeError(f"request body is over the limit of {self.max_bytes} bytes")
        response = await native_error_response(Request(scope), refusal)
        await response(scope, receive, send)

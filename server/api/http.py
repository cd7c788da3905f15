"""The HTTP application: the native and OpenAI-compatible routes, health and OpenAPI, with their middleware.

Every answer carries the request's ``x-request-id`` (``request_id.RequestIds``); every error outside
the OpenAI-compatible routes is answered in the native shape (``errors.native_error_response``); a
body over ``ApiSettings.max_request_bytes`` is refused with 413 before anything parses it.
"""

from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ApiSettings, ModelSettings
from ..errors import PayloadTooLargeError, TritonRagError
from .errors import native_error_response
from .native import health_router, native_router
from .openai import openai_router
from .request_id import RequestIds
from .services import Answers, Chats, Collections, Models, Readiness, Search


def create_http_app(
    collections: Collections,
    search: Search,
    answers: Answers,
    readiness: Readiness,
    chats: Chats,
    models: Models,
    settings: ApiSettings,
    names: ModelSettings,
) -> FastAPI:
    """The HTTP API: the native routes over ``collections``, ``search``, ``answers`` and ``readiness``; the
    OpenAI-compatible ones over ``chats`` and ``models``, for the models ``names`` names."""
    app = _App(
        title="tritonrag",
        summary="Retrieval-augmented generation served by NVIDIA Triton",
        version=metadata.version("tritonrag"),
        generate_unique_id_function=_operation_id,
    )
    app.include_router(native_router(collections, search, answers))
    app.include_router(openai_router(chats, models, names))
    app.include_router(health_router(readiness))
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    for error_class in (TritonRagError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(error_class, native_error_response)
    return app


class _App(FastAPI):
    """FastAPI with ``RequestIds`` outside all of its middleware, so that an error's answer carries the
    request id too, the 500 of a bug included (Starlette sends that one from its outermost middleware)."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIds(super().build_middleware_stack())


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

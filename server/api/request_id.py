"""Request ids over HTTP: each request's ``x-request-id`` (given or made up), handed to handlers and sent back."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tritonrag.clients.wire.schema import REQUEST_ID_HEADER


class RequestIds:
    """ASGI middleware: the request's ``x-request-id`` header, or a new id (uuid4 hex), is kept in
    ``request.state.request_id`` and returned in the ``x-request-id`` header of the answer, whatever
    the answer: a route's, an error's, a stream's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


async def request_id(request: Request) -> str:
    """The id ``RequestIds`` gave the request (``async``: FastAPI runs a plain function in its thread pool, two
    thread hops for a field read)."""
    return str(request.state.request_id)


RequestId = Annotated[str, Depends(request_id)]  # a handler's parameter: the request's id

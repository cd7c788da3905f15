"""The HTTP front-end: FastAPI routes under ``/v1/`` over the core, ``/healthz``, ``/readyz`` and OpenAPI.

Handlers parse (FastAPI, with the models of ``schema``), call the core and return its answer;
every error becomes ``{"error": {"code", "message", "field"}}`` in ``_error_detail``.

``POST /v1/query`` with ``"stream": true`` answers Server-Sent Events (``_EventStream``): the
core's first event is awaited before the answer starts, so an error up to then is an ordinary
error answer; a later one is sent as an ``error`` event. A client that goes away cancels the
stream, which closes the core's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from importlib import metadata
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tritonrag.clients.wire.schema import (
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    Document,
    JobInfo,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResult,
)

from ..config import ApiSettings
from ..errors import InvalidArgumentError, PayloadTooLargeError, TritonRagError
from .common import Core, closing, invalid_argument
from .openai import openai_router

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"  # read from the request (or made up) and sent back
_T = TypeVar("_T")

# Errors of the HTTP layer itself, named like the core's errors by the matching gRPC status code.
_HTTP_LAYER_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


class ErrorDetail(BaseModel):
    code: str  # a gRPC status code name, the same over both front-ends: NOT_FOUND, INVALID_ARGUMENT, ...
    message: str
    field: str | None = None  # the offending request field, dotted: "documents.0.text"


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request"},
    "default": {"model": ErrorBody, "description": "Error"},
}


def create_http_app(
    core: Core, settings: ApiSettings, generator_model: str = "generator", embedder_model: str = "embedder"
) -> FastAPI:
    """The HTTP API over ``core``, with the OpenAI-compatible routes for the named Triton models.

    A request body over ``settings.max_request_bytes`` is refused with 413.
    """
    app = FastAPI(
        title="tritonrag",
        summary="Retrieval-augmented generation served by NVIDIA Triton",
        version=metadata.version("tritonrag"),
        generate_unique_id_function=_operation_id,
    )
    app.include_router(_v1_routes(core))
    app.include_router(openai_router(core, generator=generator_model, embedder=embedder_model))
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "A dependency is not ready"}})
    async def readyz(response: Response) -> dict[str, bool]:
        """Readiness of each dependency of the core; 503 unless all are ready."""
        checks = await core.readiness()
        if not all(checks.values()):
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return checks

    for error_class in (TritonRagError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(error_class, _error_response)
    return app


def _v1_routes(core: Core) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=_ERROR_RESPONSES)

    @router.post("/collections", status_code=status.HTTP_201_CREATED, tags=["collections"])
    async def create_collection(request: CollectionCreate) -> CollectionInfo:
        """Create an empty collection; 409 when the name is taken."""
        return await core.create_collection(request)

    @router.get("/collections", tags=["collections"])
    async def list_collections() -> dict[str, list[CollectionInfo]]:
        return {"collections": await core.list_collections()}

    @router.get("/collections/{name}", tags=["collections"])
    async def get_collection(name: str) -> CollectionInfo:
        return await core.get_collection(name)

    @router.delete("/collections/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["collections"])
    async def delete_collection(name: str) -> None:
        """Delete a collection with its documents and indexes."""
        await core.delete_collection(name)

    @router.post(
        "/collections/{name}/documents",
        tags=["documents"],
        responses={202: {"model": UpsertResult, "description": "Accepted as a job: poll /v1/jobs/{job_id}"}},
    )
    async def upsert_documents(name: str, request: UpsertRequest, response: Response) -> UpsertResult:
        """Insert or replace documents by id; a large batch runs as a job (202 with ``job_id``)."""
        result = await core.upsert_documents(name, request)
        if result.job_id is not None:
            response.status_code = status.HTTP_202_ACCEPTED
            response.headers["Location"] = f"/v1/jobs/{result.job_id}"
        return result

    @router.get("/collections/{name}/documents/{doc_id:path}", tags=["documents"])
    async def get_document(name: str, doc_id: str) -> Document:
        return await core.get_document(name, doc_id)

    @router.delete(
        "/collections/{name}/documents/{doc_id:path}", status_code=status.HTTP_204_NO_CONTENT, tags=["documents"]
    )
    async def delete_document(name: str, doc_id: str) -> None:
        await core.delete_document(name, doc_id)

    @router.post("/collections/{name}/documents:delete", tags=["documents"])
    async def delete_by_filter(name: str, request: DeleteByFilterRequest) -> dict[str, int]:
        """Delete every document whose metadata matches the filter; answers ``{"deleted": n}``."""
        return {"deleted": await core.delete_by_filter(name, request)}

    @router.post("/search", tags=["search"])
    async def search(request: SearchRequest) -> SearchResponse:
        """Dense, sparse or hybrid retrieval with metadata filters, optional reranking and MMR."""
        return await core.search(request)

    @router.post(
        "/query",
        tags=["query"],
        response_model=QueryResponse,
        responses={
            200: {
                "description": "The answer; with `stream: true`, Server-Sent Events: `sources`, `delta`..., `done` "
                "(or `error`), each `data:` the event's JSON",
                "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _SSE_EXAMPLE}},
            },
            429: {"model": ErrorBody, "description": "The generator's queue is full; retry later"},
        },
    )
    async def query(request: QueryRequest, http_request: Request, response: Response) -> QueryResponse | Response:
        """Retrieve passages, pack them into the generator's context and answer with cited sources.

        The request id is the ``x-request-id`` header, or a new one; it is sent back in the same header.
        """
        request_id = http_request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if not request.stream:
            response.headers[REQUEST_ID_HEADER] = request_id
            return await core.query(request, request_id)
        events = core.query_stream(request, request_id)
        first = await anext(events)  # an error up to here is an ordinary error answer
        return _EventStream(_sse(first, events), headers={REQUEST_ID_HEADER: request_id})

    @router.get("/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str) -> JobInfo:
        """Progress and per-document errors of an upsert job."""
        return await core.get_job(job_id)

    return router


_SSE_EXAMPLE = """event: sources
data: {"type":"sources","sources":[{"citation":1,"doc_id":"paris","chunk_id":7,"text":"Paris is the capital of \
France.","start":0,"end":31,"metadata":{"year":2024},"score":0.93,"cited":false}],"dropped_passages":0,"degraded":[]}

event: delta
data: {"type":"delta","text":"Paris"}

event: delta
data: {"type":"delta","text":" [1]."}

event: done
data: {"type":"done","usage":{"prompt_tokens":412,"completion_tokens":4,"total_tokens":416},"finish_reason":"stop",\
"timings_ms":{"embed":4.1,"search":0.8,"generate":95.2,"total":101.3},"cited":[1],"degraded":[]}

"""


class _EventStream(StreamingResponse):
    """Server-Sent Events; ``frames`` is closed when the answer ends, however it ends.

    A client that goes away cancels the sending (Starlette listens for the disconnect), which
    leaves ``frames`` suspended: closing it closes the core's stream too.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[str], headers: dict[str, str]) -> None:
        super().__init__(frames, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with aclosing(self._frames):
            await super().__call__(scope, receive, send)


async def _sse(first: QueryEvent, events: AsyncGenerator[QueryEvent]) -> AsyncGenerator[str]:
    """``first`` (already received) and the rest of ``events`` as SSE frames; a failure becomes an ``error`` event."""
    async with closing(events):
        yield _frame(first.type, first.model_dump_json())
        try:
            async for event in events:
                yield _frame(event.type, event.model_dump_json())
        except Exception as exc:
            if not isinstance(exc, TritonRagError):
                logger.exception("query stream failed")
            _, detail = _error_detail(exc)
            yield _frame("error", ErrorBody(error=detail).model_dump_json())


def _frame(event: str, data: str) -> str:
    """One Server-Sent Event; ``data`` is compact JSON, one line."""
    return f"event: {event}\ndata: {data}\n\n"


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
        response = await _error_response(Request(scope), refusal)
        await response(scope, receive, send)


def _operation_id(route: APIRoute) -> str:
    """OpenAPI operation ids are the handlers' names (``create_collection``), for generated clients."""
    return route.name


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    """An error as an HTTP answer.

    Anything unexpected is answered 500 without details; Starlette then re-raises it to the
    server (uvicorn), which logs the traceback.
    """
    status_code, detail = _error_detail(exc)
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status_code, headers=headers)


def _error_detail(exc: Exception) -> tuple[int, ErrorDetail]:
    """The one mapping of errors to an HTTP status and the error body; anything unexpected is 500 without details."""
    if isinstance(exc, RequestValidationError):
        exc = _invalid_request(exc)
    if isinstance(exc, TritonRagError):
        return exc.http_status, ErrorDetail(code=exc.grpc_code, message=exc.message, field=exc.field)
    if isinstance(exc, HTTPException):
        return exc.status_code, ErrorDetail(code=_HTTP_LAYER_CODES.get(exc.status_code, "UNKNOWN"), message=exc.detail)
    return status.HTTP_500_INTERNAL_SERVER_ERROR, ErrorDetail(code="INTERNAL", message="internal error")


def _invalid_request(exc: RequestValidationError) -> InvalidArgumentError:
    """FastAPI's validation errors, with field paths relative to the body as over gRPC."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":  # the JSON parser's one error: (body, position)
        return InvalidArgumentError(f"malformed JSON at position {errors[0]['loc'][1]}: {errors[0]['ctx']['error']}")
    return invalid_argument(
        [{**error, "loc": error["loc"][1:]} if len(error["loc"]) > 1 else error for error in errors]
    )

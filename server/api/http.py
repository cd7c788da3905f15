"""The HTTP front-end: FastAPI routes under ``/v1/`` over the core, ``/healthz``, ``/readyz`` and OpenAPI.

Handlers parse (FastAPI, with the models of ``schema``), call the core and return its answer;
every error becomes ``{"error": {"code", "message", "field"}}`` in ``_error_response``.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ApiSettings
from ..errors import InvalidArgumentError, PayloadTooLargeError, TritonRagError
from ..schema import (
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    Document,
    JobInfo,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResult,
)
from .common import Core, invalid_argument

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


def create_http_app(core: Core, settings: ApiSettings) -> FastAPI:
    """The HTTP API over ``core``; a request body over ``settings.max_request_bytes`` is refused with 413."""
    app = FastAPI(
        title="tritonrag",
        summary="Retrieval-augmented generation served by NVIDIA Triton",
        version=metadata.version("tritonrag"),
        generate_unique_id_function=_operation_id,
    )
    app.include_router(_v1_routes(core))
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

    @router.get("/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str) -> JobInfo:
        """Progress and per-document errors of an upsert job."""
        return await core.get_job(job_id)

    return router


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
    """The one mapping of errors to HTTP answers.

    Anything unexpected is answered 500 without details; Starlette then re-raises it to the
    server (uvicorn), which logs the traceback.
    """
    if isinstance(exc, RequestValidationError):
        exc = _invalid_request(exc)
    headers = None
    if isinstance(exc, TritonRagError):
        status_code, detail = exc.http_status, ErrorDetail(code=exc.grpc_code, message=exc.message, field=exc.field)
    elif isinstance(exc, HTTPException):
        status_code, headers = exc.status_code, exc.headers
        detail = ErrorDetail(code=_HTTP_LAYER_CODES.get(exc.status_code, "UNKNOWN"), message=exc.detail)
    else:
        status_code, detail = (
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            ErrorDetail(code="INTERNAL", message="internal error"),
        )
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status_code, headers=headers)


def _invalid_request(exc: RequestValidationError) -> InvalidArgumentError:
    """FastAPI's validation errors, with field paths relative to the body as over gRPC."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":  # the JSON parser's one error: (body, position)
        return InvalidArgumentError(f"malformed JSON at position {errors[0]['loc'][1]}: {errors[0]['ctx']['error']}")
    return invalid_argument(
        [{**error, "loc": error["loc"][1:]} if len(error["loc"]) > 1 else error for error in errors]
    )

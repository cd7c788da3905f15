"""The native HTTP API's routes: collections, documents, search, query and jobs under ``/v1``; health.

Handlers parse (FastAPI, with the models of ``schema``), call a service and return its answer;
errors are the application's to answer (``errors.native_error_response``). ``POST /v1/query`` with
``"stream": true`` answers Server-Sent Events (``sse``), one ``event: <type>`` per ``QueryEvent``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.schema import (
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    DeleteByFilterResponse,
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

from .admission import Admission, RouteClass
from .auth import Guard
from .cache import CACHE_SCOPE
from .errors import ERROR_RESPONSES, ErrorBody, native_error
from .request_id import RequestId
from .services import Answers, Collections, Readiness, Search
from .sse import EventStream, event_stream, frame

# One event of a streamed answer, as OpenAPI reads the schema of a text/event-stream (3.2 names it itemSchema).
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["sources", "delta", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def model_response(model: BaseModel) -> Response:
    """``model`` as a JSON answer, serialised once: the service built it validated, and a hit of the cache
    (a millisecond in all) should not pay for FastAPI validating and encoding it again."""
    return Response(model.model_dump_json(by_alias=True), media_type="application/json")


def native_router(
    collections: Collections, search: Search, answers: Answers, admission: Admission, guard: Guard
) -> APIRouter:
    """The routes under ``/v1`` over the services, each admitted by ``guard`` for the scope it needs; upserts,
    searches and queries limited by ``admission`` too."""
    router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, dependencies=[CACHE_SCOPE])
    read, write = guard(Scope.read), guard(Scope.write)

    @router.post("/collections", status_code=status.HTTP_201_CREATED, tags=["collections"], dependencies=[write])
    async def create_collection(request: CollectionCreate) -> CollectionInfo:
        """Create an empty collection; 409 when the name is taken."""
        return await collections.create_collection(request)

    @router.get("/collections", tags=["collections"], dependencies=[read])
    async def list_collections() -> dict[str, list[CollectionInfo]]:
        return {"collections": await collections.list_collections()}

    @router.get("/collections/{name}", tags=["collections"], dependencies=[read])
    async def get_collection(name: str) -> CollectionInfo:
        return await collections.get_collection(name)

    @router.delete(
        "/collections/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["collections"], dependencies=[write]
    )
    async def delete_collection(name: str) -> None:
        """Delete a collection with its documents and indexes."""
        await collections.delete_collection(name)

    @router.post(
        "/collections/{name}/documents",
        tags=["documents"],
        responses={202: {"model": UpsertResult, "description": "Accepted as a job: poll /v1/jobs/{job_id}"}},
        dependencies=[guard(Scope.write, RouteClass.ingest), admission.dependency(RouteClass.ingest)],
    )
    async def upsert_documents(name: str, request: UpsertRequest, response: Response) -> UpsertResult:
        """Insert or replace documents by id; a large batch runs as a job (202 with ``job_id``)."""
        result = await collections.upsert_documents(name, request)
        if result.job_id is not None:
            response.status_code = status.HTTP_202_ACCEPTED
            response.headers["Location"] = f"/v1/jobs/{result.job_id}"
        return result

    @router.get("/collections/{name}/documents/{doc_id:path}", tags=["documents"], dependencies=[read])
    async def get_document(name: str, doc_id: str) -> Document:
        return await collections.get_document(name, doc_id)

    @router.delete(
        "/collections/{name}/documents/{doc_id:path}",
        status_code=status.HTTP_204_NO_CONTENT,
        tags=["documents"],
        dependencies=[write],
    )
    async def delete_document(name: str, doc_id: str) -> None:
        await collections.delete_document(name, doc_id)

    @router.post("/collections/{name}/documents:delete", tags=["documents"], dependencies=[write])
    async def delete_by_filter(name: str, request: DeleteByFilterRequest) -> DeleteByFilterResponse:
        """Delete every document whose metadata matches the filter; answers ``{"deleted": n, "revision": r}``."""
        return await collections.delete_by_filter(name, request)

    @router.post(  # named: the handler's name would hide the service's
        "/search",
        tags=["search"],
        name="search",
        response_model=SearchResponse,
        dependencies=[guard(Scope.read, RouteClass.search), admission.dependency(RouteClass.search)],
    )
    async def search_collection(request: SearchRequest, request_id: RequestId) -> Response:
        """Dense, sparse or hybrid retrieval with metadata filters, optional reranking and MMR."""
        return model_response(await search.search(request, request_id))

    @router.post(
        "/query",
        tags=["query"],
        response_model=QueryResponse,
        responses={
            200: {
                "description": "The answer; with `stream: true`, Server-Sent Events: `sources`, `delta`..., `done` "
                "(or `error`), each `data:` the event's JSON",
                "content": {"text/event-stream": {"schema": _SSE_EVENT, "example": _SSE_EXAMPLE}},
            },
            429: {
                "model": ErrorBody,
                "description": "The generator's queue is full, or too many queries are in flight; "
                "retry later (after Retry-After seconds)",
            },
        },
        dependencies=[guard(Scope.read, RouteClass.answer), admission.dependency(RouteClass.answer)],
    )
    async def query(request: QueryRequest, request_id: RequestId) -> Response | EventStream:
        """Retrieve passages, pack them into the generator's context and answer with cited sources.

        The request id is the ``x-request-id`` header, or a new one; it is sent back in the same header.
        """
        if not request.stream:
            return model_response(await answers.query(request, request_id))
        return await event_stream(answers.query_stream(request, request_id), _frames, _error_frame)

    @router.get("/jobs/{job_id}", tags=["jobs"], dependencies=[read])
    async def get_job(job_id: str) -> JobInfo:
        """Progress and per-document errors of an upsert job."""
        return await collections.get_job(job_id)

    return router


def health_router(readiness: Readiness) -> APIRouter:
    """``/healthz`` (liveness) and ``/readyz`` (readiness of each dependency)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "A dependency is not ready"}})
    async def readyz(response: Response) -> dict[str, bool]:
        """Readiness of each dependency of the services; 503 unless all are ready."""
        checks = await readiness.readiness()
        if not all(checks.values()):
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return checks

    return router


async def _frames(events: AsyncIterator[QueryEvent]) -> AsyncGenerator[str]:
    """One SSE event per ``QueryEvent``, named by its ``type``."""
    async for event in events:
        yield frame(event.model_dump_json(), event=event.type)


def _error_frame(exc: Exception) -> str:
    """A failure after the first event: an ``error`` event with the error body."""
    _, body = native_error(exc)
    return frame(body.model_dump_json(), event="error")


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

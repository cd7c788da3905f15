"""A small synchronous client of the orchestrator's HTTP API."""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Generator
from typing import Any

import httpx2

from tritonrag.clients.wire.models import ModelStatus, RetireRequest, RollbackRequest, RolloutPolicy, RolloutRequest
from tritonrag.clients.wire.schema import (
    CollectionCreate,
    CollectionInfo,
    DeltaEvent,
    Document,
    DocumentIn,
    DoneEvent,
    JobInfo,
    JobStatus,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SearchRequest,
    SearchResponse,
    SourcesEvent,
    UpsertRequest,
    UpsertResult,
)

_EVENTS: dict[str, type[QueryEvent]] = {"sources": SourcesEvent, "delta": DeltaEvent, "done": DoneEvent}


class ApiError(Exception):
    """An error answer of the API: HTTP status, gRPC-style code, message, offending field, and the
    seconds its ``Retry-After`` header asks a client to wait."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


API_KEY_ENV = "TRITONRAG_API_KEY"


class TritonRagClient:
    """``/v1`` over HTTP; every error answer raises ``ApiError``.

    ``api_key`` (an API key or a JWT; default: the environment variable ``TRITONRAG_API_KEY``) is sent as
    ``Authorization: Bearer`` with every request.
    """

    def __init__(self, base_url: str, timeout_s: float = 120.0, api_key: str | None = None) -> None:
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx2.Client(base_url=base_url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TritonRagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        response = self._http.request(method, path, json=body, headers=headers)
        if response.status_code >= 400:
            raise _api_error(response.status_code, response.text, _retry_after_s(response.headers.get("retry-after")))
        return response.json() if response.content else None

    def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        return CollectionInfo.model_validate(self._call("POST", "/v1/collections", request.model_dump(mode="json")))

    def get_collection(self, name: str) -> CollectionInfo:
        return CollectionInfo.model_validate(self._call("GET", f"/v1/collections/{name}"))

    def upsert(self, collection: str, documents: list[DocumentIn]) -> UpsertResult:
        """Insert or replace ``documents``. An inline upsert's ``revision``, given as ``min_revision`` to `search` or
        `query`, reads this write through any replica; a job's (``job_id``) is None."""
        body = UpsertRequest(documents=documents).model_dump(mode="json")
        return UpsertResult.model_validate(self._call("POST", f"/v1/collections/{collection}/documents", body))

    def get_document(self, collection: str, doc_id: str) -> Document:
        return Document.model_validate(self._call("GET", f"/v1/collections/{collection}/documents/{doc_id}"))

    def search(self, request: SearchRequest) -> SearchResponse:
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        return SearchResponse.model_validate(self._call("POST", "/v1/search", body))

    def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """A retrieval-augmented answer with its sources (``request.stream`` is ignored).

        ``request_id`` is sent as ``x-request-id`` (the server makes one up without it).
        """
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True) | {"stream": False}
        return QueryResponse.model_validate(self._call("POST", "/v1/query", body, _request_id_header(request_id)))

    def query_stream(self, request: QueryRequest, request_id: str | None = None) -> Generator[QueryEvent]:
        """The answer as it is generated: a ``SourcesEvent``, ``DeltaEvent``s, a ``DoneEvent``.

        An error before the first event raises ``ApiError`` with the answer's status; an ``error``
        event later raises ``ApiError`` with status 200 (the stream's). Leaving the loop early
        (or ``close()``) closes the connection, which stops the generation.
        """
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True) | {"stream": True}
        with self._http.sse("/v1/query", method="POST", json=body, headers=_request_id_header(request_id)) as source:
            response = source.response
            if response.status_code >= 400:
                raise _api_error(response.status_code, response.read().decode(errors="replace"))
            for sse in source:
                if sse.event == "error":
                    raise _api_error(response.status_code, sse.data)
                if sse.event in _EVENTS:  # other event names are for later versions
                    yield _EVENTS[sse.event].model_validate_json(sse.data)

    def model_statuses(self) -> list[ModelStatus]:
        """Every configured model's versions, states, traffic shares and recent events (admin)."""
        return [ModelStatus.model_validate(m) for m in self._call("GET", "/v1/admin/models")["models"]]

    def model_status(self, model: str) -> ModelStatus:
        return ModelStatus.model_validate(self._call("GET", f"/v1/admin/models/{model}"))

    def publish_model(self, model: str, version: str, policy: RolloutPolicy | None = None) -> ModelStatus:
        """Roll out a version directory already in the repository (admin); ``ApiError`` 409 when it is refused."""
        body = RolloutRequest(version=version, policy=policy).model_dump(mode="json", exclude_none=True)
        return ModelStatus.model_validate(self._call("POST", f"/v1/admin/models/{model}/rollouts", body))

    def rollback_model(self, model: str, reason: str) -> ModelStatus:
        body = RollbackRequest(reason=reason).model_dump(mode="json")
        return ModelStatus.model_validate(self._call("POST", f"/v1/admin/models/{model}/rollback", body))

    def retire_models(self, model: str, keep: int | None = None) -> ModelStatus:
        body = RetireRequest(keep=keep).model_dump(mode="json", exclude_none=True)
        return ModelStatus.model_validate(self._call("POST", f"/v1/admin/models/{model}/retire", body))

    def get_job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def wait_for_job(self, job_id: str, poll_s: float = 0.5) -> JobInfo:
        """Poll a job until it has succeeded or failed."""
        while True:
            job = self.get_job(job_id)
            if job.status in (JobStatus.succeeded, JobStatus.failed):
                return job
            time.sleep(poll_s)


def _api_error(status: int, body: str, retry_after_s: float | None = None) -> ApiError:
    """The error of an answer (or of an ``error`` event) whose body is ``{"error": {code, message, field}}``."""
    try:
        error = json.loads(body)["error"]
        return ApiError(status, error["code"], error["message"], error.get("field"), retry_after_s)
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "UNKNOWN", body, retry_after_s=retry_after_s)


def _retry_after_s(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for, given in seconds or as an HTTP date; None without one."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _request_id_header(request_id: str | None) -> dict[str, str] | None:
    return {"x-request-id": request_id} if request_id else None

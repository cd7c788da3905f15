"""A small synchronous client of the orchestrator's HTTP API."""

from __future__ import annotations

import time
from typing import Any

import httpx2

from tritonrag.server.schema import (
    CollectionCreate,
    CollectionInfo,
    Document,
    DocumentIn,
    JobInfo,
    JobStatus,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResult,
)


class ApiError(Exception):
    """An error answer of the API: HTTP status, gRPC-style code, message and offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class TritonRagClient:
    """``/v1`` over HTTP; every error answer raises ``ApiError``."""

    def __init__(self, base_url: str, timeout_s: float = 120.0) -> None:
        self._http = httpx2.Client(base_url=base_url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TritonRagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "UNKNOWN", response.text) from None
            raise ApiError(response.status_code, error["code"], error["message"], error.get("field"))
        return response.json() if response.content else None

    def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        return CollectionInfo.model_validate(self._call("POST", "/v1/collections", request.model_dump(mode="json")))

    def get_collection(self, name: str) -> CollectionInfo:
        return CollectionInfo.model_validate(self._call("GET", f"/v1/collections/{name}"))

    def upsert(self, collection: str, documents: list[DocumentIn]) -> UpsertResult:
        body = UpsertRequest(documents=documents).model_dump(mode="json")
        return UpsertResult.model_validate(self._call("POST", f"/v1/collections/{collection}/documents", body))

    def get_document(self, collection: str, doc_id: str) -> Document:
        return Document.model_validate(self._call("GET", f"/v1/collections/{collection}/documents/{doc_id}"))

    def search(self, request: SearchRequest) -> SearchResponse:
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        return SearchResponse.model_validate(self._call("POST", "/v1/search", body))

    def get_job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def wait_for_job(self, job_id: str, poll_s: float = 0.5) -> JobInfo:
        """Poll a job until it has succeeded or failed."""
        while True:
            job = self.get_job(job_id)
            if job.status in (JobStatus.succeeded, JobStatus.failed):
                return job
            time.sleep(poll_s)

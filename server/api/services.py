"""The services the front-ends call, each as the narrow protocol of what a front-end uses of it.

The implementations live in ``tritonrag.server.services``; tests give fakes (tests/fakes.py). A
front-end receives only the services it calls: the native HTTP API ``Collections``, ``Search``,
``Answers`` and ``Readiness``; gRPC ``Collections``, ``Search`` and ``Answers``; the OpenAI-compatible
API ``Chats`` and ``Models``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from tritonrag.clients.wire.models import ModelStatus, RolloutPolicy
from tritonrag.clients.wire.schema import (
    CacheFlushed,
    CacheStats,
    ChatMessage,
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    DeleteByFilterResponse,
    Document,
    Embeddings,
    GenerationDelta,
    Grounding,
    JobInfo,
    ModelVersion,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchRequest,
    SearchResponse,
    Source,
    UpsertRequest,
    UpsertResult,
)


class Collections(Protocol):
    """Collections, their documents, and the jobs that upsert large batches."""

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo: ...
    async def list_collections(self, prefix: str = "") -> list[CollectionInfo]: ...
    async def get_collection(self, name: str) -> CollectionInfo: ...
    async def delete_collection(self, name: str) -> None: ...
    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult: ...
    async def get_document(self, collection: str, doc_id: str) -> Document: ...
    async def delete_document(self, collection: str, doc_id: str) -> None: ...
    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> DeleteByFilterResponse: ...
    async def get_job(self, job_id: str) -> JobInfo: ...


class Search(Protocol):
    """Retrieval over one collection."""

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse: ...


class Answers(Protocol):
    """Grounded answers to a query, whole or as a stream of events."""

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse: ...
    def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]: ...


class Chats(Protocol):
    """The generator's streams for chat messages (optionally grounded on a collection) and raw prompts."""

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]: ...
    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]: ...


class Models(Protocol):
    """The models Triton serves, and the embedder's vectors."""

    async def served_models(self) -> list[ModelVersion]: ...
    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings: ...


class Rollouts(Protocol):
    """Model versions: their status, roll-outs, rollbacks and retirement."""

    async def statuses(self) -> list[ModelStatus]: ...
    async def status(self, model: str) -> ModelStatus: ...
    async def publish(self, model: str, version: str, policy: RolloutPolicy | None = None) -> ModelStatus: ...
    async def rollback(self, model: str, reason: str) -> ModelStatus: ...
    async def retire(self, model: str, keep: int | None = None) -> ModelStatus: ...


class CacheAdmin(Protocol):
    """The cache's counts, and its flush."""

    def stats(self) -> CacheStats: ...
    async def flush(self) -> CacheFlushed: ...


class Readiness(Protocol):
    """Whether each dependency (Triton, the stores) can serve."""

    async def readiness(self) -> dict[str, bool]: ...

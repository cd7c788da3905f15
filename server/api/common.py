"""What both front-ends share: the core they call, and how a failed validation is worded."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio

from tritonrag.clients.wire.schema import (
    ChatMessage,
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
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

from ..errors import InvalidArgumentError


class Core(Protocol):
    """The use cases the front-ends call: ``RagCore`` (server/pipeline.py) or a test double."""

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo: ...
    async def list_collections(self) -> list[CollectionInfo]: ...
    async def get_collection(self, name: str) -> CollectionInfo: ...
    async def delete_collection(self, name: str) -> None: ...
    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult: ...
    async def get_document(self, collection: str, doc_id: str) -> Document: ...
    async def delete_document(self, collection: str, doc_id: str) -> None: ...
    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> int: ...
    async def search(self, request: SearchRequest) -> SearchResponse: ...
    async def get_job(self, job_id: str) -> JobInfo: ...
    async def readiness(self) -> dict[str, bool]: ...
    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse: ...
    def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]: ...
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
    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings: ...
    async def served_models(self) -> list[ModelVersion]: ...


_T = TypeVar("_T")


async def aclose_shielded(stream: AsyncGenerator[Any]) -> None:
    """Close one of the core's streams, even from a cancelled handler: the close is shielded, so the
    stream can still await its clean-up (closing the generation, which Triton then cancels)."""
    with anyio.CancelScope(shield=True):
        await stream.aclose()


@asynccontextmanager
async def closing(stream: AsyncGenerator[_T]) -> AsyncIterator[AsyncGenerator[_T]]:
    """``contextlib.aclosing`` for the core's streams, with ``aclose_shielded``: closed however the handler
    ends, the client going away included."""
    try:
        yield stream
    finally:
        await aclose_shielded(stream)


def invalid_argument(errors: Sequence[Mapping[str, Any]]) -> InvalidArgumentError:
    """One error for a failed validation, worded the same over HTTP and gRPC.

    ``errors`` are pydantic's (``ValidationError.errors()``). The message lists every problem as
    ``field.path: problem``, sorted, since the order of keys differs between a JSON object and a
    protobuf Struct; ``field`` names the first one.
    """
    problems = sorted((".".join(map(str, error["loc"])), _problem(error)) for error in errors)
    message = "; ".join(f"{field}: {problem}" if field else problem for field, problem in problems)
    return InvalidArgumentError(message, field=problems[0][0] or None)


def _problem(error: Mapping[str, Any]) -> str:
    """Pydantic's message, without the "Value error, " it puts before our validators' own words."""
    if error["type"] == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])
    return str(error["msg"])

"""Tenants: the front-ends' services seen through the current principal's tenant.

Below the front-ends a collection's name is its key ``<tenant>/<name>`` (the catalog row, the
directory ``collections/<tenant>/<name>``, cache keys, metrics). The wrappers here are the one place
that turns the name a client sends into that key and back: each qualifies names with
``current_principal().tenant`` on the way in and strips the tenant from names, jobs and error
messages on the way out. So a tenant sees only its own collections and jobs, two tenants may use
the same name, and another tenant's collection is simply not found: a 404 that tells nothing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from tritonrag.clients.wire.schema import (
    NAME_PATTERN,
    ChatMessage,
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    DeleteByFilterResponse,
    Document,
    GenerationDelta,
    Grounding,
    JobInfo,
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

from ..errors import NotFoundError, TritonRagError
from .principal import current_principal

if TYPE_CHECKING:  # the protocols of the front-ends, whose services these wrap
    from ..api.services import Answers, Chats, Collections, Search

_Model = TypeVar("_Model", bound=BaseModel)

SEPARATOR = "/"


def collection_key(tenant: str, name: str) -> str:
    """The key of the collection ``name`` of ``tenant``."""
    return f"{tenant}{SEPARATOR}{name}"


def tenant_of(key: str) -> str:
    """The tenant in a collection key."""
    return key.partition(SEPARATOR)[0]


def _tenant() -> str:
    return current_principal().tenant


def _key(name: str) -> str:
    """The key of the current tenant's collection ``name``; a name no collection can have (a path parameter
    holding ``/`` or ``..``) is not found."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise NotFoundError(f"collection {name!r} does not exist", field="collection")
    return collection_key(_tenant(), name)


def _public(key: str) -> str:
    return key.partition(SEPARATOR)[2]


def _with(model: _Model, field: str, value: str) -> _Model:
    return model.model_copy(update={field: value})


@contextmanager
def _public_errors() -> Iterator[None]:
    """Errors as the tenant knows its names: ``'acme/docs'`` in a message becomes ``'docs'``."""
    try:
        yield
    except TritonRagError as exc:
        exc.message = exc.message.replace(f"'{_tenant()}{SEPARATOR}", "'")
        exc.args = (exc.message,)
        raise


class TenantCollections:
    """``Collections`` of the current principal's tenant."""

    def __init__(self, inner: Collections) -> None:
        self._inner = inner

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        with _public_errors():
            info = await self._inner.create_collection(_with(request, "name", _key(request.name)))
        return _with(info, "name", _public(info.name))

    async def list_collections(self, prefix: str = "") -> list[CollectionInfo]:
        with _public_errors():
            infos = await self._inner.list_collections(collection_key(_tenant(), prefix))
        return [_with(info, "name", _public(info.name)) for info in infos]

    async def get_collection(self, name: str) -> CollectionInfo:
        with _public_errors():
            info = await self._inner.get_collection(_key(name))
        return _with(info, "name", _public(info.name))

    async def delete_collection(self, name: str) -> None:
        with _public_errors():
            await self._inner.delete_collection(_key(name))

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        with _public_errors():
            result = await self._inner.upsert_documents(_key(collection), request)
        return _with(result, "collection", collection)

    async def get_document(self, collection: str, doc_id: str) -> Document:
        with _public_errors():
            return await self._inner.get_document(_key(collection), doc_id)

    async def delete_document(self, collection: str, doc_id: str) -> None:
        with _public_errors():
            await self._inner.delete_document(_key(collection), doc_id)

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> DeleteByFilterResponse:
        with _public_errors():
            return await self._inner.delete_by_filter(_key(collection), request)

    async def get_job(self, job_id: str) -> JobInfo:
        info = await self._inner.get_job(job_id)
        if tenant_of(info.collection) != _tenant():
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
        return _with(info, "collection", _public(info.collection))


class TenantSearch:
    """``Search`` over the current principal's tenant's collections."""

    def __init__(self, inner: Search) -> None:
        self._inner = inner

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        with _public_errors():
            found = await self._inner.search(_with(request, "collection", _key(request.collection)), request_id)
        return _with(found, "collection", request.collection)


class TenantAnswers:
    """``Answers`` grounded on the current principal's tenant's collections."""

    def __init__(self, inner: Answers) -> None:
        self._inner = inner

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        with _public_errors():
            answer = await self._inner.query(_with(request, "collection", _key(request.collection)), request_id)
        return _with(answer, "collection", request.collection)

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        events = self._inner.query_stream(_with(request, "collection", _key(request.collection)), request_id)
        try:
            with _public_errors():
                async for event in events:
                    yield event
        finally:
            await events.aclose()


class TenantChats:
    """``Chats`` grounded on the current principal's tenant's collections."""

    def __init__(self, inner: Chats) -> None:
        self._inner = inner

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]:
        if grounding is not None:
            grounding = _with(grounding, "collection", _key(grounding.collection))
        with _public_errors():
            return await self._inner.chat(messages, params, grounding, request_id)

    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        return self._inner.complete(prompt, params, request_id)

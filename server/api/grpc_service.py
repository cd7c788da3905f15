"""The gRPC front-end: the ``tritonrag.v1.TritonRag`` service, health checking and reflection.

Requests go through their JSON form (``json_format``) into the models of ``schema``, which
validate them exactly as over HTTP; answers come back the same way. Every error goes
through ``_rpc``, which also makes each call one telemetry record (counted, logged on one line);
``_limited`` sheds calls over their class's limit. ``QueryStream`` writes its events with
``context.write`` from within the handler, so a cancelled call (the client went away) cancels the
handler, which closes the service's stream. Every call is authenticated first (``auth.Guard``) from its
``authorization`` / ``x-api-key`` / ``x-tenant`` metadata, with the scope ``_ACCESS`` gives its method.
The request id of every call is its ``x-request-id``
metadata (or a new one); ``Search``, ``Query`` and ``QueryStream`` send it back in the initial metadata.
``cache-control: no-cache`` metadata bypasses the cache, as the header does over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ValidationError

from tritonrag.clients.wire.auth import Scope
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.clients.wire.schema import (
    REQUEST_ID_HEADER,
    CollectionCreate,
    DeleteByFilterRequest,
    QueryEvent,
    QueryRequest,
    SearchRequest,
    UpsertRequest,
)

from ..cache.scope import CacheScope, open_scope
from ..config import ApiSettings, TelemetrySettings
from ..errors import InvalidArgumentError, ResourceExhaustedError, TritonRagError
from ..security.auth import API_KEY, AUTHORIZATION, TENANT
from ..telemetry.observer import RequestTelemetry
from .admission import Admission, RouteClass
from .auth import Guard
from .cache import CACHE_CONTROL, no_cache
from .common import closing, invalid_argument
from .grpc_decoding import LenientDecoding, Undecodable
from .services import Answers, Collections, Search

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TritonRag"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request", bound=Message)
_Reply = TypeVar("_Reply", bound=Message)
_Result = TypeVar("_Result")
_Model = TypeVar("_Model", bound=BaseModel)
_Method = Callable[["_Servicer", _Request, _Context], Awaitable[_Result]]

_REQUEST_ID: ContextVar[str] = ContextVar("tritonrag_grpc_request_id")  # the id ``_rpc`` gave the call
RETRY_AFTER_METADATA = "retry-after"
# Of a status message, as UTF-8: percent-encoded it is at most three times as long, well within the 8 KiB of
# metadata a gRPC client reads at the least.
MAX_STATUS_BYTES = 1024

# Each method's scope and rate-limit class; a method missing here fails the server's creation.
_ACCESS: dict[str, tuple[Scope, RouteClass]] = {
    "CreateCollection": (Scope.write, RouteClass.manage),
    "ListCollections": (Scope.read, RouteClass.manage),
    "GetCollection": (Scope.read, RouteClass.manage),
    "DeleteCollection": (Scope.write, RouteClass.manage),
    "UpsertDocuments": (Scope.write, RouteClass.ingest),
    "GetDocument": (Scope.read, RouteClass.manage),
    "DeleteDocument": (Scope.write, RouteClass.manage),
    "DeleteByFilter": (Scope.write, RouteClass.manage),
    "Search": (Scope.read, RouteClass.search),
    "GetJob": (Scope.read, RouteClass.manage),
    "Query": (Scope.read, RouteClass.answer),
    "QueryStream": (Scope.read, RouteClass.answer),
}


def create_grpc_server(
    collections: Collections,
    search: Search,
    answers: Answers,
    settings: ApiSettings,
    admission: Admission,
    telemetry: TelemetrySettings,
    guard: Guard,
) -> grpc.aio.Server:
    """A server (not yet started) on ``settings.host:settings.grpc_port`` with the service over ``collections``,
    ``search`` and ``answers``, health and reflection; calls admitted by ``guard`` and limited by
    ``admission``, metrics and access lines as ``telemetry`` says.

    A message over ``settings.max_request_bytes`` is refused with RESOURCE_EXHAUSTED. With
    ``settings.tls_cert_file`` and ``tls_key_file`` the port serves TLS only.
    """
    unguarded = set(pb.DESCRIPTOR.services_by_name["TritonRag"].methods_by_name) - set(_ACCESS)
    if unguarded:
        raise RuntimeError(f"methods without a scope in _ACCESS: {sorted(unguarded)}")
    server = grpc.aio.server(
        interceptors=[LenientDecoding(SERVICE_NAME)],  # a request that does not decode: INVALID_ARGUMENT
        options=[("grpc.max_receive_message_length", settings.max_request_bytes)],
    )
    servicer = _Servicer(collections, search, answers, admission, RequestTelemetry(telemetry), guard)
    pb_grpc.add_TritonRagServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # "" is SERVING
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
        server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    else:
        server.add_insecure_port(address)
    return server


def _rpc(method: _Method[_Request, _Result]) -> _Method[_Request, _Result]:
    """The one mapping of errors to gRPC status codes; anything unexpected is logged and answered INTERNAL.
    A refusal that says when to retry has it in the ``retry-after`` trailing metadata (seconds).

    A streaming RPC that fails after its first message ends with the same status. The call is one
    telemetry record, its route the full method name, its status the code name.
    """
    route = f"/{SERVICE_NAME}/{method.__name__}"
    scope, route_class = _ACCESS[method.__name__]

    @functools.wraps(method)
    async def mapped(self: _Servicer, request: _Request, context: _Context) -> _Result:
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get(REQUEST_ID_HEADER)
        request_id = given if isinstance(given, str) and given else uuid.uuid4().hex
        _REQUEST_ID.set(request_id)
        with self.telemetry.request("grpc", "POST", request_id) as record:
            record.route = route
            cache_control = metadata.get(CACHE_CONTROL)
            bypass = isinstance(cache_control, str) and no_cache(cache_control)
            open_scope(CacheScope(bypass=bypass, report=record.report_cache))
            error: TritonRagError
            try:
                await self.guard.admit(
                    _text(metadata, AUTHORIZATION),
                    _text(metadata, API_KEY),
                    _text(metadata, TENANT),
                    scope,
                    route_class,
                )
                if isinstance(request, Undecodable):
                    raise request.error()
                result = await method(self, request, context)
            except ValidationError as exc:
                error = invalid_argument(exc.errors())
            except TritonRagError as exc:
                error = exc
            except asyncio.CancelledError:
                record.status = grpc.StatusCode.CANCELLED.name
                raise
            except Exception:
                logger.exception("%s failed", method.__name__)
                error = TritonRagError("internal error")
            else:
                record.status = grpc.StatusCode.OK.name
                return result
            record.status = error.grpc_code
            retry = error.retry_after_s if isinstance(error, ResourceExhaustedError) else None
            trailing = ((RETRY_AFTER_METADATA, str(retry)),) if retry is not None else ()
            await context.abort(grpc.StatusCode[error.grpc_code], _status_message(error.message), trailing)

    return mapped


def _status_message(message: str) -> str:
    """``message`` cut at ``MAX_STATUS_BYTES``: it may quote the request (a name or an id of any length)."""
    data = message.encode()
    if len(data) <= MAX_STATUS_BYTES:
        return message
    return f"{data[: MAX_STATUS_BYTES - 3].decode(errors='ignore')}…"  # "…" is three bytes


def _text(metadata: dict[str, str | bytes], key: str) -> str | None:
    """A text metadata value; None when absent or binary."""
    value = metadata.get(key)
    return value if isinstance(value, str) else None


def _limited(route_class: RouteClass) -> Callable[[_Method[_Request, _Result]], _Method[_Request, _Result]]:
    """Run the RPC in a place of ``route_class`` (``Admission.slot``); under ``_rpc``, which maps a refusal."""

    def limit(method: _Method[_Request, _Result]) -> _Method[_Request, _Result]:
        @functools.wraps(method)
        async def limited(self: _Servicer, request: _Request, context: _Context) -> _Result:
            with self.admission.slot(route_class):
                return await method(self, request, context)

        return limited

    return limit


def _model(model: type[_Model], message: Message, *, without: str | None = None) -> _Model:
    """``message`` in its JSON form validated by ``model``; ``without`` drops a field that is an argument of its own."""
    try:
        data = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except json_format.SerializeToJsonError as exc:  # a Struct's NaN or infinity, which JSON lacks
        raise InvalidArgumentError(str(exc)) from exc
    if without is not None:
        del data[without]
    return model.model_validate(_integral(data))


def _integral(value: Any) -> Any:
    """Struct numbers are doubles: whole ones are read as ints, as JSON does not tell 2 from 2.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def _message(model: BaseModel, message: _Reply) -> _Reply:
    """``message`` filled from the JSON form of ``model``."""
    return json_format.ParseDict(model.model_dump(mode="json"), message)


def _event(event: QueryEvent) -> pb.QueryEvent:
    """A streamed event in the ``oneof`` member named by its ``type``: ``sources``, ``delta`` or ``done``."""
    return json_format.ParseDict({event.type: event.model_dump(mode="json", exclude={"type"})}, pb.QueryEvent())


async def _request_id(context: _Context) -> str:
    """The call's request id (``_rpc``'s), sent back in the initial metadata."""
    request_id = _REQUEST_ID.get()
    await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
    return request_id


class _Servicer(pb_grpc.TritonRagServicer):
    """Each RPC parses its request, calls a service and converts the answer."""

    def __init__(
        self,
        collections: Collections,
        search: Search,
        answers: Answers,
        admission: Admission,
        telemetry: RequestTelemetry,
        guard: Guard,
    ) -> None:
        self._collections = collections
        self._search = search
        self._answers = answers
        self.admission = admission
        self.telemetry = telemetry
        self.guard = guard

    @_rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: _Context) -> pb.CollectionInfo:
        info = await self._collections.create_collection(_model(CollectionCreate, request))
        return _message(info, pb.CollectionInfo())

    @_rpc
    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: _Context
    ) -> pb.ListCollectionsResponse:
        collections = await self._collections.list_collections()
        return pb.ListCollectionsResponse(collections=[_message(info, pb.CollectionInfo()) for info in collections])

    @_rpc
    async def GetCollection(self, request: pb.GetCollectionRequest, context: _Context) -> pb.CollectionInfo:
        return _message(await self._collections.get_collection(request.name), pb.CollectionInfo())

    @_rpc
    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: _Context
    ) -> pb.DeleteCollectionResponse:
        await self._collections.delete_collection(request.name)
        return pb.DeleteCollectionResponse()

    @_rpc
    @_limited(RouteClass.ingest)
    async def UpsertDocuments(self, request: pb.UpsertDocumentsRequest, context: _Context) -> pb.UpsertResult:
        result = await self._collections.upsert_documents(
            request.collection, _model(UpsertRequest, request, without="collection")
        )
        return _message(result, pb.UpsertResult())

    @_rpc
    async def GetDocument(self, request: pb.GetDocumentRequest, context: _Context) -> pb.Document:
        return _message(await self._collections.get_document(request.collection, request.doc_id), pb.Document())

    @_rpc
    async def DeleteDocument(self, request: pb.DeleteDocumentRequest, context: _Context) -> pb.DeleteDocumentResponse:
        await self._collections.delete_document(request.collection, request.doc_id)
        return pb.DeleteDocumentResponse()

    @_rpc
    async def DeleteByFilter(self, request: pb.DeleteByFilterRequest, context: _Context) -> pb.DeleteByFilterResponse:
        filters = _model(DeleteByFilterRequest, request, without="collection")
        deleted = await self._collections.delete_by_filter(request.collection, filters)
        return _message(deleted, pb.DeleteByFilterResponse())

    @_rpc
    @_limited(RouteClass.search)
    async def Search(self, request: pb.SearchRequest, context: _Context) -> pb.SearchResponse:
        found = await self._search.search(_model(SearchRequest, request), await _request_id(context))
        return _message(found, pb.SearchResponse())

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: _Context) -> pb.JobInfo:
        return _message(await self._collections.get_job(request.id), pb.JobInfo())

    @_rpc
    @_limited(RouteClass.answer)
    async def Query(self, request: pb.QueryRequest, context: _Context) -> pb.QueryResponse:
        query = _model(QueryRequest, request)
        return _message(await self._answers.query(query, await _request_id(context)), pb.QueryResponse())

    @_rpc
    @_limited(RouteClass.answer)
    async def QueryStream(  # type: ignore[override]  # a handler that writes with context.write returns None
        self, request: pb.QueryRequest, context: _Context
    ) -> None:
        query = _model(QueryRequest, request).model_copy(update={"stream": True})
        async with closing(self._answers.query_stream(query, await _request_id(context))) as events:
            async for event in events:
                await context.write(_event(event))

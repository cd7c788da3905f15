"""The gRPC front-end: the ``tritonrag.v1.TritonRag`` service over the core, health checking and reflection.

Requests go through their JSON form (``json_format``) into the models of ``schema``, which
validate them exactly as over HTTP; answers come back the same way. Every error goes
through ``_rpc``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ValidationError

from tritonrag.clients.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc

from ..config import ApiSettings
from ..errors import TritonRagError
from ..schema import CollectionCreate, DeleteByFilterRequest, SearchRequest, UpsertRequest
from .common import Core, invalid_argument

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TritonRag"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request", bound=Message)
_Reply = TypeVar("_Reply", bound=Message)
_Model = TypeVar("_Model", bound=BaseModel)


def create_grpc_server(core: Core, settings: ApiSettings) -> grpc.aio.Server:
    """A server (not yet started) on ``settings.host:settings.grpc_port`` with the service, health and reflection.

    A message over ``settings.max_request_bytes`` is refused with RESOURCE_EXHAUSTED.
    """
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_request_bytes)])
    pb_grpc.add_TritonRagServicer_to_server(_Servicer(core), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # "" is SERVING
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    return server


def _rpc(
    method: Callable[[_Servicer, _Request, _Context], Awaitable[_Reply]],
) -> Callable[[_Servicer, _Request, _Context], Awaitable[_Reply]]:
    """The one mapping of errors to gRPC status codes; anything unexpected is logged and answered INTERNAL."""

    @functools.wraps(method)
    async def mapped(self: _Servicer, request: _Request, context: _Context) -> _Reply:
        error: TritonRagError
        try:
            return await method(self, request, context)
        except ValidationError as exc:
            error = invalid_argument(exc.errors())
        except TritonRagError as exc:
            error = exc
        except Exception:
            logger.exception("%s failed", method.__name__)
            error = TritonRagError("internal error")
        await context.abort(grpc.StatusCode[error.grpc_code], error.message)

    return mapped


def _model(model: type[_Model], message: Message, *, without: str | None = None) -> _Model:
    """``message`` in its JSON form validated by ``model``; ``without`` drops a field that is an argument of its own."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
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


class _Servicer(pb_grpc.TritonRagServicer):
    """Each RPC parses its request, calls the core and converts the answer."""

    def __init__(self, core: Core) -> None:
        self._core = core

    @_rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: _Context) -> pb.CollectionInfo:
        info = await self._core.create_collection(_model(CollectionCreate, request))
        return _message(info, pb.CollectionInfo())

    @_rpc
    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: _Context
    ) -> pb.ListCollectionsResponse:
        collections = await self._core.list_collections()
        return pb.ListCollectionsResponse(collections=[_message(info, pb.CollectionInfo()) for info in collections])

    @_rpc
    async def GetCollection(self, request: pb.GetCollectionRequest, context: _Context) -> pb.CollectionInfo:
        return _message(await self._core.get_collection(request.name), pb.CollectionInfo())

    @_rpc
    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: _Context
    ) -> pb.DeleteCollectionResponse:
        await self._core.delete_collection(request.name)
        return pb.DeleteCollectionResponse()

    @_rpc
    async def UpsertDocuments(self, request: pb.UpsertDocumentsRequest, context: _Context) -> pb.UpsertResult:
        result = await self._core.upsert_documents(
            request.collection, _model(UpsertRequest, request, without="collection")
        )
        return _message(result, pb.UpsertResult())

    @_rpc
    async def GetDocument(self, request: pb.GetDocumentRequest, context: _Context) -> pb.Document:
        return _message(await self._core.get_document(request.collection, request.doc_id), pb.Document())

    @_rpc
    async def DeleteDocument(self, request: pb.DeleteDocumentRequest, context: _Context) -> pb.DeleteDocumentResponse:
        await self._core.delete_document(request.collection, request.doc_id)
        return pb.DeleteDocumentResponse()

    @_rpc
    async def DeleteByFilter(self, request: pb.DeleteByFilterRequest, context: _Context) -> pb.DeleteByFilterResponse:
        filters = _model(DeleteByFilterRequest, request, without="collection")
        return pb.DeleteByFilterResponse(deleted=await self._core.delete_by_filter(request.collection, filters))

    @_rpc
    async def Search(self, request: pb.SearchRequest, context: _Context) -> pb.SearchResponse:
        return _message(await self._core.search(_model(SearchRequest, request)), pb.SearchResponse())

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: _Context) -> pb.JobInfo:
        return _message(await self._core.get_job(request.id), pb.JobInfo())

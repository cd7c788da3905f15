"""Requests of the gRPC service that are no messages of their type, answered as the caller's error.

grpcio answers UNKNOWN when a request does not decode (bytes that are no message, a string that is no UTF-8,
nesting deeper than protobuf's limit). ``LenientDecoding`` decodes the service's requests without raising:
such a request reaches its handler as an ``Undecodable``, which ``grpc_service._rpc`` refuses with
INVALID_ARGUMENT once the caller is admitted, as one more telemetry record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidArgumentError


class Undecodable:
    """A request that did not decode, with protobuf's reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(f"the request is not a valid message: {self.reason}")


class LenientDecoding(grpc.aio.ServerInterceptor):
    """Decodes the requests of the service ``service`` (its full name) into messages or ``Undecodable``s."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]  # set by grpcio
        if handler is None or not method.startswith(self._prefix) or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError as exc:
                return Undecodable(str(exc))

        # The service's methods are unary-unary and unary-stream.
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(handler.unary_stream, lenient, handler.response_serializer)
        assert handler.unary_unary is not None
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, lenient, handler.response_serializer)

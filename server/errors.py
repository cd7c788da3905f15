"""Typed errors of the core; the front-ends map each to one HTTP status and one gRPC code."""

from __future__ import annotations


class TritonRagError(Exception):
    """Base of every error the core raises on purpose."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgumentError(TritonRagError):
    """The request is malformed; ``field`` names the offending field."""

    http_status = 422
    grpc_code = "INVALID_ARGUMENT"


class UnauthenticatedError(TritonRagError):
    """The request carries no credential, or one that is invalid, expired or revoked."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(TritonRagError):
    """The credential is valid but its scopes do not allow the operation."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class NotFoundError(TritonRagError):
    """A collection, document or job that does not exist."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class AlreadyExistsError(TritonRagError):
    """Creating something that exists."""

    http_status = 409
    grpc_code = "ALREADY_EXISTS"


class PayloadTooLargeError(TritonRagError):
    """The request is over a configured size limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(TritonRagError):
    """The system is not in a state where the operation can run (e.g. a model version that fails validation,
    a rollback with no version to return to); the message says what is wrong."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class UnavailableError(TritonRagError):
    """A dependency (Triton, a store) cannot serve right now; retrying later may succeed."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class DeadlineExceededError(TritonRagError):
    """The request's deadline passed before it could be served."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(TritonRagError):
    """A bounded queue is full (e.g. the generator's); retrying later may succeed.

    ``retry_after_s``, when set, is how long the client should wait: the ``Retry-After`` header over HTTP,
    the ``retry-after`` trailing metadata over gRPC.
    """

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, field: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s

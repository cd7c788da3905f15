"""The error answers of both HTTP APIs: their bodies, and the one mapping of every error to each.

Both map the same typed errors (``tritonrag.server.errors``), FastAPI's validation errors and
Starlette's own (404, 405); anything else is a bug, answered 500 without details:

- native: ``{"error": {"code", "message", "field"}}`` with the error's HTTP status; ``code`` is the
  gRPC status code name, the same over HTTP and gRPC.
- OpenAI: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ..errors import InvalidArgumentError, ResourceExhaustedError, TritonRagError, UnauthenticatedError
from .common import invalid_argument

logger = logging.getLogger(__name__)


def error_headers(exc: Exception) -> dict[str, str] | None:
    """The headers an error's answer carries: ``Retry-After`` when it says when to retry, ``WWW-Authenticate``
    when a credential is missing or refused; None for any other."""
    if isinstance(exc, ResourceExhaustedError) and exc.retry_after_s is not None:
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, UnauthenticatedError):
        return {"WWW-Authenticate": "Bearer"}
    return None


def _malformed_json(exc: RequestValidationError) -> str | None:
    """The message of a body that is not JSON; None for a body that parsed."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":  # the JSON parser's one error: (body, position)
        return f"malformed JSON at position {errors[0]['loc'][1]}: {errors[0]['ctx']['error']}"
    return None


def _body_relative(exc: RequestValidationError) -> list[Mapping[str, Any]]:
    """FastAPI's validation errors, with field paths relative to the body, as over gRPC."""
    return [{**error, "loc": error["loc"][1:]} if len(error["loc"]) > 1 else error for error in exc.errors()]


# The native API


class ErrorDetail(BaseModel):
    code: str  # a gRPC status code name, the same over both front-ends: NOT_FOUND, INVALID_ARGUMENT, ...
    message: str
    field: str | None = None  # the offending request field, dotted: "documents.0.text"


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


# The error answers of the native routes in the OpenAPI document: a refused request, and any other error.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request"},
    "default": {"model": ErrorBody, "description": "Error"},
}


# Errors of the HTTP layer itself, named like the services' errors by the matching gRPC status code.
_HTTP_LAYER_CODES = {401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


def native_error(exc: Exception) -> tuple[int, ErrorBody]:
    """The HTTP status and the body of ``exc`` in the native API."""
    if isinstance(exc, RequestValidationError):
        malformed = _malformed_json(exc)
        exc = InvalidArgumentError(malformed) if malformed else invalid_argument(_body_relative(exc))
    if isinstance(exc, TritonRagError):
        detail = ErrorDetail(code=exc.grpc_code, message=exc.message, field=exc.field)
        return exc.http_status, ErrorBody(error=detail)
    if isinstance(exc, HTTPException):
        detail = ErrorDetail(code=_HTTP_LAYER_CODES.get(exc.status_code, "UNKNOWN"), message=exc.detail)
        return exc.status_code, ErrorBody(error=detail)
    return status.HTTP_500_INTERNAL_SERVER_ERROR, ErrorBody(
        error=ErrorDetail(code="INTERNAL", message="internal error")
    )


async def native_error_response(request: Request, exc: Exception) -> JSONResponse:
    """``exc`` as the native API's answer: the application's exception handler.

    A bug is answered 500 without details; Starlette then re-raises it to the server (uvicorn),
    which logs the traceback.
    """
    status_code, body = native_error(exc)
    headers = exc.headers if isinstance(exc, HTTPException) else error_headers(exc)
    if status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        headers = {"Allow": _allowed_methods(request)}
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """The methods some route takes at the request's path, for a 405's ``Allow``: Starlette's names those of the
    first route there alone (``/v1/collections`` has one route for GET and one for POST)."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


# The OpenAI-compatible API


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """The body of every error answer, as OpenAI's."""

    error: OpenAIErrorDetail


class OpenAIError(Exception):
    """An error as OpenAI words it; ``openai_error`` maps every other error to one."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> OpenAIErrorBody:
        detail = OpenAIErrorDetail(
            message=self.message, type=_error_type(self.status), param=self.param, code=self.code
        )
        return OpenAIErrorBody(error=detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error(exc: Exception) -> OpenAIError:
    """``exc`` as OpenAI's error: the services' keep their HTTP status; their code is the gRPC one, lower-case."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        malformed = _malformed_json(exc)
        return OpenAIError(malformed, code="invalid_json") if malformed else openai_invalid(_body_relative(exc))
    if isinstance(exc, TritonRagError):
        code = exc.grpc_code.lower()
        return OpenAIError(exc.message, status=exc.http_status, param=exc.field, code=code, headers=error_headers(exc))
    if isinstance(exc, HTTPException):
        return OpenAIError(str(exc.detail), status=exc.status_code)
    return OpenAIError("internal error", status=500, code="internal")


_VALIDATION_CODES = {"missing": "missing_required_parameter", "literal_error": "unsupported_value"}


def openai_invalid(
    errors: Sequence[Mapping[str, Any]], prefix: tuple[str | int, ...] = (), renames: Mapping[str, str] | None = None
) -> OpenAIError:
    """400 for pydantic's ``errors`` under ``prefix``, worded as over the native API; ``param`` names the first
    field, renamed by ``renames``."""
    renames = renames or {}
    located = [
        {**e, "loc": (*prefix, *(renames.get(p, p) if isinstance(p, str) else p for p in e["loc"]))} for e in errors
    ]
    wording = invalid_argument(located)
    first = next(e for e in located if ".".join(map(str, e["loc"])) == (wording.field or ""))
    kind = str(first["type"])
    code = _VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    return OpenAIError(wording.message, param=wording.field, code=code)


def log_unexpected(exc: Exception, where: str) -> None:
    """Log the traceback of a bug (an error of none of the known kinds) that is answered without details."""
    if not isinstance(exc, TritonRagError | OpenAIError | HTTPException | RequestValidationError):
        logger.error("unexpected error in %s", where, exc_info=exc)

"""OpenAI-compatible endpoints over the core: chat completions, completions, embeddings and models.

Clients written for OpenAI's API (the official SDKs and what is built on them) work unchanged
against ``/v1``. Handlers parse the OpenAI request, map it to the core's types, call the core and
map the answer back. A chat completion can be grounded on a collection with the extension field
``"tritonrag": {"collection": ...}`` (``schema.Grounding``); the answer then carries
``"tritonrag": {"sources": [...]}``.

Every error is answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, by
the router's own route class, so the router needs no application-level handlers. Fields of OpenAI's
API that this server cannot honour (``n`` > 1, ``logprobs``, ``tools``, penalties, ...) are refused
with 400; fields that change nothing here (``user``, ``store``, ``metadata``, ...) are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from tritonrag.clients.wire.schema import (
    ChatMessage,
    Embeddings,
    FinishReason,
    GenerationDelta,
    Grounding,
    SamplingParams,
    Source,
    Usage,
)

from ..errors import TritonRagError
from .common import Core, aclose_shielded, closing, invalid_argument

_logger = logging.getLogger(__name__)

OWNER = "tritonrag"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat has none
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request

OpenAIFinishReason = Literal["stop", "length"]


# Requests


def _text_parts(value: Any) -> Any:
    """A message's ``content``, as a string or a list of parts, as a list of parts."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


def _string_list(value: Any) -> Any:
    """``stop`` as a string or a list of strings, as a list."""
    return [value] if isinstance(value, str) else value


def _texts(value: Any) -> Any:
    """``input``/``prompt`` as a string or a list of strings, as a list; token ids are refused."""
    if isinstance(value, str):
        return [value]
    if _token_ids(value) or (isinstance(value, list) and value and all(_token_ids(item) for item in value)):
        raise ValueError("token-id arrays are not supported: send text")
    return value


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    )


class _OpenAIRequest(BaseModel):
    """OpenAI adds request fields often: those this server does not use are ignored."""

    model_config = ConfigDict(extra="ignore")


class ContentPart(_OpenAIRequest):
    type: str
    text: str | None = None


class RequestMessage(_OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[list[ContentPart] | None, BeforeValidator(_text_parts)] = None
    tool_calls: list[Any] | None = None


class StreamOptions(_OpenAIRequest):
    include_usage: bool | None = None


class _SamplingRequest(_OpenAIRequest):
    """The fields chat completions and completions share."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_string_list)] = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None  # not OpenAI's: as vLLM and others take it
    repetition_penalty: float | None = None  # not OpenAI's: as vLLM and others take it


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``; ``tritonrag`` grounds the answer on a collection."""

    messages: list[RequestMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    tritonrag: Grounding | None = None


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: one prompt, continued."""

    prompt: Annotated[list[str], BeforeValidator(_texts)]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    tritonrag: Any = None  # refused: only chat completions are grounded


class EmbeddingRequest(_OpenAIRequest):
    """``POST /v1/embeddings``."""

    model: str
    input: Annotated[list[str], BeforeValidator(_texts), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, texts: list[str]) -> list[str]:
        empty = [i for i, text in enumerate(texts) if not text]
        if empty:
            raise ValueError(f"input {empty[0]} is an empty string")
        return texts


# Responses


def _omitted_if_none(value: Any) -> bool:
    return value is None


class TritonRagExtension(BaseModel):
    """What a grounded chat completion adds: the passages the generator was given."""

    sources: list[Source]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    tritonrag: TritonRagExtension | None = Field(None, exclude_if=_omitted_if_none)


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omitted_if_none)
    content: str | None = Field(None, exclude_if=_omitted_if_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: OpenAIFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion; with ``include_usage`` the last has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omitted_if_none)
    tritonrag: TritonRagExtension | None = Field(None, exclude_if=_omitted_if_none)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None  # None in the events of a stream but the last
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or one event of a streamed one (the same object, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_omitted_if_none)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a string: base64 of little-endian float32


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OpenAIModel(BaseModel):
    """A served Triton model; ``created`` is unknown (0)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNER


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """The body of every error answer, as OpenAI's."""

    error: OpenAIErrorDetail


# Errors


class OpenAIError(Exception):
    """An error as OpenAI words it; every other error is mapped to one by ``_as_openai_error``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(OpenAIErrorBody(error=self.detail()).model_dump(), status_code=self.status)

    def detail(self) -> OpenAIErrorDetail:
        return OpenAIErrorDetail(message=self.message, type=_error_type(self.status), param=self.param, code=self.code)


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _as_openai_error(exc: Exception) -> OpenAIError:
    """The one mapping of errors to OpenAI's; the core's keep their status, their code is the gRPC one."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":  # (body, position)
            return OpenAIError(
                f"malformed JSON at position {errors[0]['loc'][1]}: {errors[0]['ctx']['error']}", code="invalid_json"
            )
        return _invalid_request([{**e, "loc": e["loc"][1:]} if len(e["loc"]) > 1 else e for e in errors])
    if isinstance(exc, TritonRagError):
        return OpenAIError(exc.message, status=exc.http_status, param=exc.field, code=exc.grpc_code.lower())
    if isinstance(exc, HTTPException):
        return OpenAIError(str(exc.detail), status=exc.status_code)
    _logger.error("unexpected error in an OpenAI-compatible endpoint", exc_info=exc)
    return OpenAIError("internal error", status=500, code="internal")


_VALIDATION_CODES = {"missing": "missing_required_parameter", "literal_error": "unsupported_value"}


def _invalid_request(
    errors: Sequence[Mapping[str, Any]], prefix: tuple[str | int, ...] = (), renames: Mapping[str, str] | None = None
) -> OpenAIError:
    """400 for pydantic's ``errors``, worded as over the native API; ``param`` names the first field."""
    renames = renames or {}
    located = [
        {**e, "loc": (*prefix, *(renames.get(p, p) if isinstance(p, str) else p for p in e["loc"]))} for e in errors
    ]
    wording = invalid_argument(located)
    first = next(e for e in located if ".".join(map(str, e["loc"])) == (wording.field or ""))
    kind = str(first["type"])
    code = _VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    return OpenAIError(wording.message, param=wording.field, code=code)


class _OpenAIRoute(APIRoute):
    """Answers every error of its endpoint in OpenAI's shape, whatever the application's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return _as_openai_error(exc).response()

        return handle


# Mapping requests to the core


# Fields of OpenAI's API this server cannot honour, when set to anything that would change the answer.
_REFUSED: dict[str, str] = {
    "n": "only one choice per request is supported (n=1)",
    "presence_penalty": "presence_penalty is not supported; repetition_penalty is",
    "frequency_penalty": "frequency_penalty is not supported; repetition_penalty is",
    "logit_bias": "logit_bias is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "tools": "tools (function calling) are not supported",
    "tool_choice": "tools (function calling) are not supported",
    "functions": "functions (function calling) are not supported",
    "function_call": "functions (function calling) are not supported",
    "response_format": "response_format other than text is not supported",
    "audio": "audio output is not supported",
    "modalities": "output modalities other than text are not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "best_of": "best_of > 1 is not supported",
    "tritonrag": "grounding (tritonrag) is only supported by /v1/chat/completions",
}


def _refuse_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    refused = {
        "n": request.n not in (None, 1),
        "presence_penalty": bool(request.presence_penalty),
        "frequency_penalty": bool(request.frequency_penalty),
        "logit_bias": bool(request.logit_bias),
    }
    if isinstance(request, ChatCompletionRequest):
        refused |= {
            "logprobs": bool(request.logprobs),
            "top_logprobs": bool(request.top_logprobs),
            "tools": bool(request.tools),
            "tool_choice": request.tool_choice not in (None, "none", "auto"),
            "functions": bool(request.functions),
            "function_call": request.function_call not in (None, "none", "auto"),
            "response_format": request.response_format not in (None, {"type": "text"}),
            "audio": request.audio is not None,
            "modalities": request.modalities not in (None, ["text"]),
            "prediction": request.prediction is not None,
            "web_search_options": request.web_search_options is not None,
        }
    else:
        refused |= {
            "logprobs": request.logprobs is not None,
            "echo": bool(request.echo),
            "suffix": bool(request.suffix),
            "best_of": request.best_of not in (None, 1),
            "tritonrag": request.tritonrag is not None,
        }
    for param, is_refused in refused.items():
        if is_refused:
            raise OpenAIError(_REFUSED[param], param=param, code="unsupported_parameter")


def _generation_params(request: _SamplingRequest, default_max_tokens: int | None = None) -> SamplingParams:
    """The core's sampling parameters; OpenAI's defaults where a field is omitted (``temperature`` 1)."""
    max_tokens, max_tokens_param = request.max_tokens, "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise OpenAIError("give max_completion_tokens or max_tokens, not both", param="max_tokens")
        max_tokens, max_tokens_param = request.max_completion_tokens, "max_completion_tokens"
    values = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "seed": request.seed,
        "stop": request.stop,
        "repetition_penalty": request.repetition_penalty,
    }
    try:
        return SamplingParams.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise _invalid_request(exc.errors(), renames={"max_tokens": max_tokens_param}) from None


_CHAT_MESSAGES = TypeAdapter(list[ChatMessage])


def _chat_messages(messages: Sequence[RequestMessage]) -> list[ChatMessage]:
    """Text messages; ``developer`` is a ``system`` message; tool messages and non-text parts are refused."""
    plain: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function") or message.tool_calls:
            raise OpenAIError(
                "tool and function messages are not supported", param=f"messages.{i}.role", code="unsupported_value"
            )
        if message.content is None and message.role != "assistant":
            raise OpenAIError(
                f"{message.role} messages need content",
                param=f"messages.{i}.content",
                code="missing_required_parameter",
            )
        texts: list[str] = []
        for j, part in enumerate(message.content or []):
            if part.type != "text" or part.text is None:
                raise OpenAIError(
                    f"content parts of type {part.type!r} are not supported: only text",
                    param=f"messages.{i}.content.{j}.type",
                    code="unsupported_value",
                )
            texts.append(part.text)
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": "\n".join(texts)})
    try:
        return _CHAT_MESSAGES.validate_python(plain)
    except ValidationError as exc:
        raise _invalid_request(exc.errors(), prefix=("messages",)) from None


async def _require_model(core: Core, requested: str, serving: str, endpoint: str) -> None:
    """Whether ``requested`` is the model serving ``endpoint`` (``serving``), and Triton serves it now.

    404 ``model_not_found`` for a model that is not served, as OpenAI; 400 for a served model that
    does another job; 503 when ``serving`` itself is not ready (clients retry 503).
    """
    served = {model.name for model in await core.served_models()}
    if requested == serving and requested not in served:
        raise OpenAIError(
            f"the model `{requested}` is not ready; retry later", status=503, param="model", code="model_not_ready"
        )
    if requested not in served:
        raise OpenAIError(f"The model `{requested}` does not exist", status=404, param="model", code="model_not_found")
    if requested != serving:
        raise OpenAIError(
            f"the model `{requested}` does not serve {endpoint}: use `{serving}`",
            param="model",
            code="model_not_supported",
        )


# Mapping the core's answers


def _finish_reason(reason: FinishReason | None) -> OpenAIFinishReason:
    """OpenAI's: ``cancelled`` (the client went away) does not exist there, and is a stop."""
    return "length" if reason == FinishReason.length else "stop"


class _Tally:
    """The text, finish reason and token counts of a generation, as its deltas come."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, delta: GenerationDelta) -> None:
        self.texts.append(delta.text)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.completion_tokens = delta.completion_tokens or self.completion_tokens

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


async def _generate(deltas: AsyncGenerator[GenerationDelta]) -> _Tally:
    """A whole generation."""
    tally = _Tally()
    async with closing(deltas):
        async for delta in deltas:
            tally.add(delta)
    return tally


class _Started:
    """The core's deltas with the first one already fetched.

    A generation that cannot start (the generator's queue is full, Triton is down) then fails
    before the stream's status is sent, so the client gets 429 or 503 and can retry.
    """

    def __init__(self, deltas: AsyncGenerator[GenerationDelta]) -> None:
        self._deltas = deltas
        self._first: GenerationDelta | None = None

    @classmethod
    async def start(cls, deltas: AsyncGenerator[GenerationDelta]) -> _Started:
        started = cls(deltas)
        try:
            started._first = await anext(deltas)
        except StopAsyncIteration:
            pass
        except BaseException:
            await aclose_shielded(deltas)
            raise
        return started

    def __aiter__(self) -> _Started:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._deltas)

    async def aclose(self) -> None:
        await aclose_shielded(self._deltas)


class _EventStream(StreamingResponse):
    """Server-sent events of the core's stream, which is closed when the response ends: done, failed or the client gone.

    The events are sent from the request's own task, so one task drives the core's stream from its
    first delta to its close. When the client goes away that task is cancelled once, as asyncio does
    (Starlette's streaming response would cancel an anyio scope instead, which cancels every await
    in it again and again): the core's stream can then clean up, awaiting what it must (cancelling
    the generation on Triton), before it is closed.
    """

    def __init__(self, events: AsyncGenerator[str], source: _Started) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._events = events
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        ended = gone = False

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nonlocal gone
            if not ended:
                gone = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self._events:
                if gone:  # the core's stream swallowed the cancellation
                    break
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
        finally:
            ended = True
            watcher.cancel()
            if gone:
                task.uncancel()
            await aclose_shielded(self._events)
            await self._source.aclose()


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def _events(
    head: BaseModel | None,
    deltas: _Started,
    piece: Callable[[str, OpenAIFinishReason | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> AsyncGenerator[str]:
    """The SSE events of a generation: ``head``, one ``piece`` per delta, the usage, ``[DONE]``.

    An error after the stream started is sent as an ``{"error": ...}`` event, and the stream ends
    without ``[DONE]``, as OpenAI does.
    """
    tally = _Tally()
    if head is not None:
        yield _event(head)
    try:
        async for delta in deltas:
            tally.add(delta)
            if delta.text or delta.finish_reason is not None:
                finish = None if delta.finish_reason is None else _finish_reason(delta.finish_reason)
                yield _event(piece(delta.text, finish))
    except Exception as exc:
        yield _event(OpenAIErrorBody(error=_as_openai_error(exc).detail()))
        return
    if tally.finish_reason is None:  # the core's stream ended without saying why
        yield _event(piece("", "stop"))
    if usage_chunk is not None:
        yield _event(usage_chunk(tally.usage))
    yield "data: [DONE]\n\n"


def _base64(vector: Sequence[float]) -> str:
    """A vector as OpenAI's ``base64`` encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _include_usage(request: _SamplingRequest) -> bool:
    return request.stream_options is not None and bool(request.stream_options.include_usage)


def _chat_completion(model: str, tally: _Tally, extension: TritonRagExtension | None) -> ChatCompletion:
    choice = ChatChoice(
        message=AssistantMessage(content="".join(tally.texts)), finish_reason=_finish_reason(tally.finish_reason)
    )
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=tally.usage,
        tritonrag=extension,
    )


async def _chat_completion_stream(
    model: str, deltas: AsyncGenerator[GenerationDelta], extension: TritonRagExtension | None, include_usage: bool
) -> _EventStream:
    """A role chunk (with the sources of a grounded answer), a chunk per delta, the usage chunk if asked."""
    started = await _Started.start(deltas)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[ChunkChoice], **fields: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, **fields)

    def piece(text: str, finish: OpenAIFinishReason | None) -> ChatCompletionChunk:
        return chunk([ChunkChoice(delta=ChunkDelta(content=text or None), finish_reason=finish)])

    head = chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))], tritonrag=extension)
    usage_chunk = (lambda usage: chunk([], usage=usage)) if include_usage else None
    return _EventStream(_events(head, started, piece, usage_chunk), started)


def _completion(model: str, tally: _Tally) -> Completion:
    choice = CompletionChoice(text="".join(tally.texts), finish_reason=_finish_reason(tally.finish_reason))
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=[choice], usage=tally.usage
    )


async def _completion_stream(model: str, deltas: AsyncGenerator[GenerationDelta], include_usage: bool) -> _EventStream:
    """A completion object per delta, and one with the usage if asked."""
    started = await _Started.start(deltas)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage)

    def piece(text: str, finish: OpenAIFinishReason | None) -> Completion:
        return chunk([CompletionChoice(text=text, finish_reason=finish)])

    usage_chunk = (lambda usage: chunk([], usage)) if include_usage else None
    return _EventStream(_events(None, started, piece, usage_chunk), started)


def _embedding_list(model: str, embeddings: Embeddings, encoding_format: str | None) -> EmbeddingList:
    encode: Callable[[list[float]], list[float] | str] = _base64 if encoding_format == "base64" else list
    return EmbeddingList(
        data=[Embedding(index=i, embedding=encode(vector)) for i, vector in enumerate(embeddings.vectors)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=embeddings.prompt_tokens, total_tokens=embeddings.prompt_tokens),
    )


def _json(answer: BaseModel) -> JSONResponse:
    return JSONResponse(answer.model_dump(mode="json"))


def _request_id(request: Request) -> str | None:
    return request.headers.get("x-request-id")


# Routes


_RESPONSES: dict[int | str, dict[str, Any]] = {"default": {"model": OpenAIErrorBody, "description": "Error"}}


def openai_router(core: Core, *, generator: str = "generator", embedder: str = "embedder") -> APIRouter:
    """OpenAI's chat completions, completions, embeddings and models under ``/v1`` over ``core``.

    ``generator`` and ``embedder`` are the names of the served models these endpoints use; a
    request names them in ``model``.
    """
    router = APIRouter(prefix="/v1", route_class=_OpenAIRoute, tags=["openai"], responses=_RESPONSES)

    @router.post(
        "/chat/completions",
        responses={200: {"model": ChatCompletion, "description": "With `stream`: server-sent ChatCompletionChunk"}},
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI's chat completion, streamed or not; ``tritonrag`` grounds it on a collection."""
        _refuse_unsupported(body)
        params, messages = _generation_params(body), _chat_messages(body.messages)
        await _require_model(core, body.model, generator, "chat completions")
        sources, deltas = await core.chat(messages, params, body.tritonrag, _request_id(request))
        extension = None if body.tritonrag is None else TritonRagExtension(sources=sources)
        if body.stream:
            return await _chat_completion_stream(body.model, deltas, extension, _include_usage(body))
        return _json(_chat_completion(body.model, await _generate(deltas), extension))

    @router.post(
        "/completions",
        responses={200: {"model": Completion, "description": "With `stream`: server-sent Completion events"}},
    )
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's (legacy) completion of one prompt, streamed or not; ``max_tokens`` defaults to 16."""
        _refuse_unsupported(body)
        if len(body.prompt) != 1:
            raise OpenAIError("one prompt per request is supported", param="prompt", code="unsupported_value")
        params = _generation_params(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        await _require_model(core, body.model, generator, "completions")
        deltas = core.complete(body.prompt[0], params, _request_id(request))
        if body.stream:
            return await _completion_stream(body.model, deltas, _include_usage(body))
        return _json(_completion(body.model, await _generate(deltas)))

    @router.post("/embeddings")
    async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingList:
        """Vectors of texts; ``encoding_format`` ``base64`` (the official clients' default) or ``float``."""
        await _require_model(core, body.model, embedder, "embeddings")
        embeddings = await core.embed(body.input, _request_id(request))
        dimension = len(embeddings.vectors[0]) if embeddings.vectors else 0
        if body.dimensions is not None and body.dimensions != dimension:
            raise OpenAIError(
                f"the model `{body.model}` gives {dimension} dimensions; other sizes are not supported",
                param="dimensions",
                code="unsupported_value",
            )
        return _embedding_list(body.model, embeddings, body.encoding_format)

    @router.get("/models")
    async def list_models() -> OpenAIModelList:
        """The models Triton serves."""
        return OpenAIModelList(data=[OpenAIModel(id=model.name) for model in await core.served_models()])

    @router.get("/models/{model_id}")
    async def retrieve_model(model_id: str) -> OpenAIModel:
        """One served model; 404 ``model_not_found`` for another name."""
        if model_id not in {model.name for model in await core.served_models()}:
            raise OpenAIError(
                f"The model `{model_id}` does not exist", status=404, param="model", code="model_not_found"
            )
        return OpenAIModel(id=model_id)

    return router

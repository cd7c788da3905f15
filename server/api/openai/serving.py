"""OpenAI's requests mapped to the services, and the services' answers mapped back to OpenAI's.

Fields of OpenAI's API that this server cannot honour (``n`` > 1, ``logprobs``, ``tools``,
penalties, ...) are refused with 400; fields that change nothing here (``user``, ``store``,
``metadata``, ...) are ignored. A chat completion can be grounded on a collection with the extension
field ``"tritonrag": {"collection": ...}`` (``schema.Grounding``); the answer then carries
``"tritonrag": {"sources": [...]}``.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError

from tritonrag.clients.wire.schema import ChatMessage, Embeddings, FinishReason, GenerationDelta, SamplingParams, Usage

from ...config import ModelSettings
from ..common import closing
from ..errors import OpenAIError, openai_error, openai_invalid
from ..services import Chats, Models
from ..sse import EventStream, Frames, event_stream, frame
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    OpenAIFinishReason,
    OpenAIModel,
    OpenAIModelList,
    RequestMessage,
    SamplingRequest,
    TritonRagExtension,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat has none
DONE = frame("[DONE]")  # the last event of a stream that did not fail


class OpenAIServing:
    """The OpenAI-compatible endpoints over the services: each method takes a parsed request and answers it.

    ``names.generator`` serves chat completions and completions, ``names.embedder`` embeddings; a
    request names them in ``model``.
    """

    def __init__(self, chats: Chats, models: Models, names: ModelSettings) -> None:
        self._chats = chats
        self._models = models
        self._names = names

    async def chat_completion(self, body: ChatCompletionRequest, request_id: str) -> ChatCompletion | EventStream:
        """A chat completion, whole or streamed; ``tritonrag`` grounds it on a collection."""
        _refuse_unsupported(body)
        params, messages = _generation_params(body), _chat_messages(body.messages)
        await self._require_model(body.model, self._names.generator, "chat completions")
        sources, deltas = await self._chats.chat(messages, params, body.tritonrag, request_id)
        extension = None if body.tritonrag is None else TritonRagExtension(sources=sources)
        if body.stream:
            return await event_stream(deltas, _chat_chunks(body.model, extension, body.include_usage), _error_frame)
        return _chat_completion(body.model, await _generate(deltas), extension)

    async def completion(self, body: CompletionRequest, request_id: str) -> Completion | EventStream:
        """The (legacy) completion of one prompt, whole or streamed; ``max_tokens`` defaults to 16."""
        _refuse_unsupported(body)
        if len(body.prompt) != 1:
            raise OpenAIError("one prompt per request is supported", param="prompt", code="unsupported_value")
        params = _generation_params(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        await self._require_model(body.model, self._names.generator, "completions")
        deltas = self._chats.complete(body.prompt[0], params, request_id)
        if body.stream:
            return await event_stream(deltas, _completion_chunks(body.model, body.include_usage), _error_frame)
        return _completion(body.model, await _generate(deltas))

    async def embedding(self, body: EmbeddingRequest, request_id: str) -> EmbeddingList:
        """Vectors of texts, as floats or base64; a ``dimensions`` other than the model's is refused."""
        await self._require_model(body.model, self._names.embedder, "embeddings")
        embeddings = await self._models.embed(body.input, request_id)
        dimension = len(embeddings.vectors[0]) if embeddings.vectors else 0
        if body.dimensions is not None and body.dimensions != dimension:
            raise OpenAIError(
                f"the model `{body.model}` gives {dimension} dimensions; other sizes are not supported",
                param="dimensions",
                code="unsupported_value",
            )
        return _embedding_list(body.model, embeddings, body.encoding_format)

    async def model_list(self) -> OpenAIModelList:
        """The models Triton serves."""
        return OpenAIModelList(data=[OpenAIModel(id=name) for name in await self._served()])

    async def model(self, model_id: str) -> OpenAIModel:
        """One served model; 404 ``model_not_found`` for another name."""
        if model_id not in await self._served():
            raise _model_not_found(model_id)
        return OpenAIModel(id=model_id)

    async def _served(self) -> list[str]:
        return [model.name for model in await self._models.served_models()]

    async def _require_model(self, requested: str, serving: str, endpoint: str) -> None:
        """Whether ``requested`` is the model serving ``endpoint`` (``serving``), and Triton serves it now.

        404 ``model_not_found`` for a model that is not served, as OpenAI; 400 for a served model that
        does another job; 503 when ``serving`` itself is not ready (clients retry 503).
        """
        served = await self._served()
        if requested == serving and requested not in served:
            raise OpenAIError(
                f"the model `{requested}` is not ready; retry later", status=503, param="model", code="model_not_ready"
            )
        if requested not in served:
            raise _model_not_found(requested)
        if requested != serving:
            raise OpenAIError(
                f"the model `{requested}` does not serve {endpoint}: use `{serving}`",
                param="model",
                code="model_not_supported",
            )


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(f"The model `{model}` does not exist", status=404, param="model", code="model_not_found")


# Requests


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
    """400 ``unsupported_parameter`` for the first field set to what this server cannot honour."""
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


def _generation_params(request: SamplingRequest, default_max_tokens: int | None = None) -> SamplingParams:
    """The services' sampling parameters; OpenAI's defaults where a field is omitted (``temperature`` 1)."""
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
        raise openai_invalid(exc.errors(), renames={"max_tokens": max_tokens_param}) from None


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
        raise openai_invalid(exc.errors(), prefix=("messages",)) from None


# Answers


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


def _completion(model: str, tally: _Tally) -> Completion:
    choice = CompletionChoice(text="".join(tally.texts), finish_reason=_finish_reason(tally.finish_reason))
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=[choice], usage=tally.usage
    )


def _error_frame(exc: Exception) -> str:
    """A failure during a stream: an ``{"error": ...}`` event; the stream then ends without ``[DONE]``, as OpenAI's."""
    return frame(openai_error(exc).body().model_dump_json())


Piece = Callable[[str, OpenAIFinishReason | None], BaseModel]  # one delta's text and finish reason as a chunk


async def _events(
    deltas: AsyncIterator[GenerationDelta],
    head: BaseModel | None,
    piece: Piece,
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> AsyncGenerator[str]:
    """The events of a streamed generation: ``head``, one ``piece`` per delta, the usage, ``[DONE]``."""
    tally = _Tally()
    if head is not None:
        yield frame(head.model_dump_json())
    async for delta in deltas:
        tally.add(delta)
        if delta.text or delta.finish_reason is not None:
            finish = None if delta.finish_reason is None else _finish_reason(delta.finish_reason)
            yield frame(piece(delta.text, finish).model_dump_json())
    if tally.finish_reason is None:  # the service's stream ended without saying why
        yield frame(piece("", "stop").model_dump_json())
    if usage_chunk is not None:
        yield frame(usage_chunk(tally.usage).model_dump_json())
    yield DONE


def _chat_chunks(model: str, extension: TritonRagExtension | None, include_usage: bool) -> Frames[GenerationDelta]:
    """A role chunk (with the sources of a grounded answer), a chunk per delta, the usage chunk if asked."""
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[ChunkChoice], **fields: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, **fields)

    def piece(text: str, finish: OpenAIFinishReason | None) -> ChatCompletionChunk:
        return chunk([ChunkChoice(delta=ChunkDelta(content=text or None), finish_reason=finish)])

    head = chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))], tritonrag=extension)
    usage_chunk = (lambda usage: chunk([], usage=usage)) if include_usage else None
    return lambda deltas: _events(deltas, head, piece, usage_chunk)


def _completion_chunks(model: str, include_usage: bool) -> Frames[GenerationDelta]:
    """A completion object per delta, and one with the usage if asked."""
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=completion_id, created=created, model=model, choices=choices, usage=usage)

    def piece(text: str, finish: OpenAIFinishReason | None) -> Completion:
        return chunk([CompletionChoice(text=text, finish_reason=finish)])

    usage_chunk = (lambda usage: chunk([], usage)) if include_usage else None
    return lambda deltas: _events(deltas, None, piece, usage_chunk)


def _embedding_list(model: str, embeddings: Embeddings, encoding_format: str | None) -> EmbeddingList:
    encode: Callable[[list[float]], list[float] | str] = _base64 if encoding_format == "base64" else list
    return EmbeddingList(
        data=[Embedding(index=i, embedding=encode(vector)) for i, vector in enumerate(embeddings.vectors)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=embeddings.prompt_tokens, total_tokens=embeddings.prompt_tokens),
    )


def _base64(vector: Sequence[float]) -> str:
    """A vector as OpenAI's ``base64`` encoding: little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")

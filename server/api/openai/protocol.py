"""OpenAI's wire models as this server reads and writes them: the requests and the answers.

Request fields OpenAI's API has and this server does not use are ignored (OpenAI adds fields
often); ``serving`` refuses those that would change the answer. The error body, shared with the
mapping of errors, is ``tritonrag.server.api.errors.OpenAIErrorBody``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tritonrag.clients.wire.schema import MAX_CHAT_MESSAGES, Grounding, Source, Usage

OWNER = "tritonrag"
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


class SamplingRequest(_OpenAIRequest):
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

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``; ``tritonrag`` grounds the answer on a collection."""

    messages: list[RequestMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
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


class CompletionRequest(SamplingRequest):
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


# Answers


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

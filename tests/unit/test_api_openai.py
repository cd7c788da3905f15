"""The OpenAI-compatible endpoints, served by uvicorn over fake services, called by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes import PROMPT_TOKENS, SERVED, VECTORS, FakeAnswers, FakeModels, FakeServices, Pace, open_guard
from tests.harness import serving
from tritonrag.clients.wire.schema import (
    ChatMessage,
    CollectionCreate,
    DocumentIn,
    FinishReason,
    Grounding,
    SamplingParams,
    Source,
    UpsertRequest,
)
from tritonrag.server.api.admission import Admission
from tritonrag.server.api.openai import openai_router
from tritonrag.server.api.request_id import RequestIds
from tritonrag.server.config import LimitsSettings, ModelSettings
from tritonrag.server.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

REPLY = ["The capital", " of France", " is Paris", " [1]."]
COMPLETION_TOKENS = len(REPLY)  # a token per piece
SOURCES = [  # the one document of the collection "docs", as the fake search finds it
    Source(
        citation=1,
        doc_id="paris",
        chunk_id=0,
        text="Paris is the capital of France.",
        start=0,
        end=31,
        metadata={"year": 2024},
        score=1.0,
    )
]
GROUNDING = {
    "collection": "docs",
    "top_k": 3,
    "mode": "dense",
    "filters": {"field": "year", "op": "gte", "value": 2020},
    "rerank": True,
}


async def store_sources(fakes: FakeServices) -> None:
    """The collection "docs" with a document per source."""
    await fakes.collections.create_collection(CollectionCreate(name="docs"))
    documents = [DocumentIn(id=source.doc_id, text=source.text, metadata=source.metadata) for source in SOURCES]
    await fakes.collections.upsert_documents("docs", UpsertRequest(documents=documents))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeServices, str]]:
    """One server for the module, over fakes that each test resets."""
    fakes = FakeServices.create()
    asyncio.run(store_sources(fakes))
    app = FastAPI()  # no exception handlers: the router answers its own errors
    app.include_router(
        openai_router(fakes.answers, fakes.models, ModelSettings(), Admission(LimitsSettings()), open_guard())
    )
    app.add_middleware(RequestIds)
    with serving(app) as url:
        yield fakes, f"{url}/v1"


@pytest.fixture
def answers(served: tuple[FakeServices, str]) -> FakeAnswers:
    """The chats, answering ``REPLY`` to everything."""
    answers = served[0].answers
    answers.reset()
    answers.reply = REPLY
    return answers


@pytest.fixture
def models(served: tuple[FakeServices, str]) -> FakeModels:
    served[0].models.reset()
    return served[0].models


@pytest.fixture
def base_url(served: tuple[FakeServices, str], answers: FakeAnswers, models: FakeModels) -> str:
    return served[1]


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as openai_client:
        yield openai_client


USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The ``error`` object of an answer, checked for OpenAI's shape."""
    assert isinstance(exc.body, dict)
    assert set(exc.body) == {"message", "type", "param", "code"}
    return exc.body


# Models


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        ("embedder", "model", "tritonrag"),
        ("reranker", "model", "tritonrag"),
        ("generator", "model", "tritonrag"),
    ]
    assert client.models.retrieve("generator").id == "generator"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert error_of(raised.value)["code"] == "model_not_found"


# Chat completions


def test_chat_completion(client: openai.OpenAI, answers: FakeAnswers) -> None:
    completion = client.chat.completions.create(
        model="generator",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital"}, {"type": "text", "text": "of France?"}]},
        ],
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "generator"
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "".join(REPLY))
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        PROMPT_TOKENS + COMPLETION_TOKENS,
    )
    assert "tritonrag" not in (completion.model_extra or {})
    [(messages, params, grounding)] = answers.chats
    assert messages == [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Capital\nof France?"),
    ]
    assert params == SamplingParams(temperature=1.0)  # OpenAI's default temperature
    assert grounding is None
    assert answers.streams_closed.is_set()


def test_chat_parameters(client: openai.OpenAI, answers: FakeAnswers) -> None:
    client.chat.completions.create(
        model="generator",
        messages=USER,
        max_completion_tokens=32,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop="\n",
        user="someone",  # ignored
        extra_body={"top_k": 40, "repetition_penalty": 1.2, "presence_penalty": 0},
    )
    client.chat.completions.create(model="generator", messages=USER, max_tokens=8, stop=["a", "b"])
    assert [params for _, params, _ in answers.chats] == [
        SamplingParams(
            max_tokens=32, temperature=0.0, top_p=0.5, seed=7, stop=["\n"], top_k=40, repetition_penalty=1.2
        ),
        SamplingParams(max_tokens=8, temperature=1.0, stop=["a", "b"]),
    ]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [(FinishReason.length, "length"), (FinishReason.cancelled, "stop")],
)
def test_chat_finish_reasons(client: openai.OpenAI, answers: FakeAnswers, reason: FinishReason, expected: str) -> None:
    answers.finish_reason = reason
    assert client.chat.completions.create(model="generator", messages=USER).choices[0].finish_reason == expected
    chunks = list(client.chat.completions.create(model="generator", messages=USER, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [expected]


def test_chat_stream(client: openai.OpenAI, answers: FakeAnswers) -> None:
    whole = client.chat.completions.create(model="generator", messages=USER).choices[0].message.content

    chunks = list(client.chat.completions.create(model="generator", messages=USER, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks)

    with_usage = list(
        client.chat.completions.create(
            model="generator", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    *pieces, last = with_usage
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        PROMPT_TOKENS + COMPLETION_TOKENS,
    )
    assert all(c.usage is None for c in pieces)


def test_stream_is_server_sent_events(base_url: str) -> None:
    body = {"model": "generator", "messages": USER, "stream": True}
    with httpx2.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {")
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_grounded_chat(client: openai.OpenAI, answers: FakeAnswers) -> None:
    completion = client.chat.completions.create(model="generator", messages=USER, extra_body={"tritonrag": GROUNDING})
    sources = [source.model_dump(mode="json") for source in SOURCES]
    assert (completion.model_extra or {})["tritonrag"] == {"sources": sources}
    assert answers.chats[0][2] == Grounding.model_validate(GROUNDING)

    chunks = list(
        client.chat.completions.create(
            model="generator", messages=USER, stream=True, extra_body={"tritonrag": {"collection": "docs"}}
        )
    )
    assert (chunks[0].model_extra or {})["tritonrag"] == {"sources": sources}
    assert all("tritonrag" not in (c.model_extra or {}) for c in chunks[1:])
    assert answers.chats[1][2] == Grounding(collection="docs")


# Completions


def test_completions(client: openai.OpenAI, answers: FakeAnswers) -> None:
    completion = client.completions.create(model="generator", prompt="Paris is")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert (choice.text, choice.finish_reason) == ("".join(REPLY), "stop")
    assert completion.usage is not None
    assert completion.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS

    chunks = list(
        client.completions.create(
            model="generator", prompt=["Paris is"], stream=True, stream_options={"include_usage": True}, max_tokens=64
        )
    )
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == choice.text
    assert [c.choices[0].finish_reason for c in pieces] == [None] * (len(pieces) - 1) + ["stop"]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == COMPLETION_TOKENS
    assert answers.completions == [
        ("Paris is", SamplingParams(max_tokens=16, temperature=1.0)),  # OpenAI's default max_tokens
        ("Paris is", SamplingParams(max_tokens=64, temperature=1.0)),
    ]


@pytest.mark.parametrize(
    ("arguments", "param", "message"),
    [
        ({"prompt": ["one", "two"]}, "prompt", "one prompt per request"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id arrays are not supported"),
        ({"echo": True}, "echo", "echo is not supported"),
        ({"logprobs": 2}, "logprobs", "logprobs are not supported"),
        ({"extra_body": {"tritonrag": {"collection": "docs"}}}, "tritonrag", "only supported by /v1/chat"),
    ],
)
def test_completions_refused(
    client: openai.OpenAI, answers: FakeAnswers, arguments: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**{"model": "generator", "prompt": "Paris is", **arguments})
    error = error_of(raised.value)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert message in error["message"]
    assert answers.completions == []


# Embeddings


def test_embeddings(client: openai.OpenAI, models: FakeModels) -> None:
    default = client.embeddings.create(model="embedder", input=["first", "second", "third"])  # base64 on the wire
    assert [e.embedding for e in default.data] == [VECTORS[0], VECTORS[1], VECTORS[0]]
    assert [e.index for e in default.data] == [0, 1, 2]
    assert (default.model, default.usage.prompt_tokens, default.usage.total_tokens) == ("embedder", 9, 9)

    floats = client.embeddings.create(model="embedder", input="first", encoding_format="float", dimensions=4)
    assert [e.embedding for e in floats.data] == [VECTORS[0]]
    assert models.embedded == [["first", "second", "third"], ["first"]]


def test_embeddings_base64_on_the_wire(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="embedder", input="first", encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == VECTORS[0]


@pytest.mark.parametrize(
    ("arguments", "param", "message"),
    [
        ({"input": [[1, 2, 3]]}, "input", "token-id arrays are not supported: send text"),
        ({"input": [1, 2, 3]}, "input", "token-id arrays are not supported: send text"),
        ({"input": ["fine", ""]}, "input", "input 1 is an empty string"),
        ({"input": [["not", "tokens"]]}, "input.0", "Input should be a valid string"),
        ({"input": []}, "input", "at least 1 item"),
        ({"model": "generator"}, "model", "does not serve embeddings"),
        ({"encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ],
)
def test_embeddings_refused(client: openai.OpenAI, arguments: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(**{"model": "embedder", "input": "text", **arguments})
    error = error_of(raised.value)
    assert error["param"] == param
    assert message in error["message"]


def test_embedding_dimensions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="embedder", input="text", dimensions=2)
    assert error_of(raised.value) == {
        "message": "the model `embedder` gives 4 dimensions; other sizes are not supported",
        "type": "invalid_request_error",
        "param": "dimensions",
        "code": "unsupported_value",
    }


# Errors


def test_unknown_model(client: openai.OpenAI, answers: FakeAnswers, models: FakeModels) -> None:
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=USER),
        lambda: client.completions.create(model="gpt-4o", prompt="x"),
        lambda: client.embeddings.create(model="text-embedding-3-small", input="x"),
    ):
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        error = error_of(raised.value)
        assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
        assert "does not exist" in error["message"]
    assert not answers.chats and not answers.completions and not models.embedded


@pytest.mark.parametrize(
    ("arguments", "param", "message"),
    [
        ({"n": 2}, "n", "only one choice"),
        ({"logprobs": True}, "logprobs", "logprobs are not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty is"),
        ({"frequency_penalty": 0.1}, "frequency_penalty", "repetition_penalty is"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format"),
        ({"temperature": 3.0}, "temperature", "less than or equal to 2"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"max_tokens": 100_000}, "max_tokens", "less than or equal to 8192"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"stop": ""}, "stop", "stop strings must not be empty"),
        ({"model": "embedder"}, "model", "does not serve chat completions"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages.0.role", "tool"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system', 'developer'"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "user messages need content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
            "only text",
        ),
        ({"extra_body": {"tritonrag": {"collection": "docs", "topk": 3}}}, "tritonrag.topk", "Extra inputs"),
        ({"extra_body": {"tritonrag": {"collection": "no such!"}}}, "tritonrag.collection", "match pattern"),
        ({"extra_body": {"tritonrag": {"collection": "docs", "mode": "fuzzy"}}}, "tritonrag.mode", "'dense'"),
    ],
)
def test_chat_refused(
    client: openai.OpenAI, answers: FakeAnswers, arguments: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**{"model": "generator", "messages": USER, **arguments})
    error = error_of(raised.value)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert message in error["message"]
    assert answers.chats == []


def test_malformed_requests(base_url: str) -> None:
    malformed = httpx2.post(
        f"{base_url}/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json"
    missing = httpx2.post(f"{base_url}/chat/completions", json={"messages": USER})
    assert missing.status_code == 400
    assert missing.json() == {
        "error": {
            "message": "model: Field required",
            "type": "invalid_request_error",
            "param": "model",
            "code": "missing_required_parameter",
        }
    }
    not_an_object = httpx2.post(f"{base_url}/embeddings", json=["text"])
    assert not_an_object.status_code == 400
    assert not_an_object.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_core_errors(client: openai.OpenAI, answers: FakeAnswers, stream: bool) -> None:
    answers.start_error = ResourceExhaustedError("the generator's queue is full")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="generator", messages=USER, stream=stream)
    assert error_of(limited.value) == {
        "message": "the generator's queue is full",
        "type": "rate_limit_error",
        "param": None,
        "code": "resource_exhausted",
    }
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="generator", prompt="x", stream=stream)

    answers.start_error = InvalidArgumentError("the prompt is longer than the context window", field="messages")
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="generator", messages=USER, stream=stream)
    assert error_of(invalid.value)["message"] == "the prompt is longer than the context window"
    assert error_of(invalid.value)["param"] == "messages"

    answers.call_error = NotFoundError("collection 'docs' does not exist", field="collection")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="generator", messages=USER, stream=stream, extra_body={"tritonrag": {"collection": "docs"}}
        )
    assert error_of(missing.value)["code"] == "not_found"


def test_model_not_ready(client: openai.OpenAI, answers: FakeAnswers, models: FakeModels) -> None:
    models.served = [model for model in SERVED if model.name != "generator"]
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="generator", messages=USER)
    assert raised.value.status_code == 503
    assert error_of(raised.value) == {
        "message": "the model `generator` is not ready; retry later",
        "type": "server_error",
        "param": "model",
        "code": "model_not_ready",
    }
    assert [m.id for m in client.models.list().data] == ["embedder", "reranker"]
    assert not answers.chats


def test_embedder_unavailable(client: openai.OpenAI, models: FakeModels) -> None:
    models.call_error = UnavailableError("the embedder is unavailable")
    with pytest.raises(openai.InternalServerError) as raised:
        client.embeddings.create(model="embedder", input="text")
    assert raised.value.status_code == 503
    assert error_of(raised.value)["type"] == "server_error"


def test_error_during_a_stream(client: openai.OpenAI, answers: FakeAnswers) -> None:
    answers.stream_error = UnavailableError("the generator went away")
    stream = client.chat.completions.create(model="generator", messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="the generator went away"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == REPLY[0]
    assert answers.streams_closed.wait(5)


@pytest.mark.parametrize("pace", ["busy", "idle"])
def test_client_closing_a_stream_closes_the_core_stream(
    client: openai.OpenAI, answers: FakeAnswers, pace: Pace
) -> None:
    answers.stream = pace  # busy: the core keeps yielding; idle: the core waits for a token that never comes
    stream = client.chat.completions.create(model="generator", messages=USER, stream=True)
    assert next(stream).choices[0].delta.role == "assistant"
    assert next(stream).choices[0].delta.content == REPLY[0]
    assert not answers.streams_closed.is_set()
    stream.close()
    assert answers.streams_closed.wait(5), "the core's stream is still open after the client left"

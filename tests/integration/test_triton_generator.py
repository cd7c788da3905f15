"""The generator model on a real tritonserver (tiny model exported by the real exporter): streaming through
``TritonPool.generate`` against the engine run in-process, the chat template, input errors, and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tests.generation import Collected
from tests.harness import wait_until
from tests.promql import TRITON_SERIES
from tritonrag.clients.wire.schema import ChatMessage, GenerationDelta, SamplingParams
from tritonrag.deploy.launcher import TritonServer
from tritonrag.export.runtime.contract import GeneratorMetrics
from tritonrag.export.runtime.engine import GenerationEngine, GenerationRequest
from tritonrag.export.runtime.sampling import SamplingParams as EngineSamplingParams
from tritonrag.server.config import ModelSettings, RoutingSettings
from tritonrag.server.errors import InvalidArgumentError, ResourceExhaustedError
from tritonrag.server.routing.resilience import BreakerState
from tritonrag.server.routing.triton_pool import TritonPool

# generator_small: a context window of 2048, one sequence slot, a wait queue of one, no prompt truncation.
SMALL_WINDOW = 2048
# The slot holder: a sampled generation is the slow kind (a softmax over the whole vocabulary per token), and
# 2000 of them take many seconds, so it cannot end by itself while a test sets up the queue around it.
HOLD = SamplingParams(max_tokens=2000, temperature=1.0, seed=3)
HOLD_PROMPT = "Hi there"
YARDSTICK = SamplingParams(max_tokens=200, temperature=1.0, seed=5)


def pool_to(url: str, generator: str = "generator") -> TritonPool:
    """A pool to one Triton with ``generator`` as the generator: a busy generator is tried twice; probes are
    patient with a loaded machine."""
    return TritonPool([url], ROUTING, ModelSettings(generator=generator))


ROUTING = RoutingSettings(
    max_attempts=2,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    probe_interval_s=0.5,
    probe_timeout_s=10,
)


@pytest.fixture(scope="module")
def version_dir(tiny_repository: Path) -> Path:
    return tiny_repository / "generator" / "1"


@pytest.fixture(scope="module")
def tokenizer(version_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(version_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def engine(version_dir: Path) -> GenerationEngine:
    return GenerationEngine.from_version_dir(version_dir, threads=1)


def in_process(engine: GenerationEngine, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> Collected:
    """The engine's output for ``prompt`` (tokenised as the model does) run alone, in this process."""
    out = Collected()
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    sampling = EngineSamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=tuple(params.stop),
        repetition_penalty=params.repetition_penalty,
    )
    engine.submit(GenerationRequest(ids, sampling, out.emit))
    engine.run_until_idle()
    return out


async def collect(stream: AsyncIterator[GenerationDelta]) -> list[GenerationDelta]:
    return [delta async for delta in stream]


def served(
    triton: TritonServer,
    params: SamplingParams,
    prompt: str | None = None,
    messages: list[ChatMessage] | None = None,
) -> list[GenerationDelta]:
    """Every delta of one generation through a fresh pool."""

    async def run() -> list[GenerationDelta]:
        async with pool_to(triton.endpoints.grpc_url) as pool:
            return await collect(pool.generate(params, prompt=prompt, messages=messages))

    return asyncio.run(run())


def text_of(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


STREAMED = [
    ("The weather today is sunny and warm", SamplingParams(max_tokens=24)),
    (
        "Once upon a time",
        SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=7, repetition_penalty=1.1),
    ),
]


@pytest.mark.parametrize(("prompt", "params"), STREAMED, ids=["greedy", "seeded-sampling"])
def test_streamed_deltas_add_up_to_the_engines_text_run_in_process(
    tiny_triton: TritonServer, engine: GenerationEngine, tokenizer: Tokenizer, prompt: str, params: SamplingParams
) -> None:
    deltas = served(tiny_triton, params, prompt=prompt)
    expected = in_process(engine, tokenizer, prompt, params)
    assert params.max_tokens is not None
    assert text_of(deltas) == "".join(expected.deltas) != ""
    assert len([d for d in deltas if d.text]) > 1, "the text came in one piece, not streamed"
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == expected.reason == "length"
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert (last.prompt_tokens, last.completion_tokens) == expected.counts == (prompt_tokens, params.max_tokens)


def test_messages_are_rendered_with_the_models_chat_template(
    tiny_triton: TritonServer, tiny_sources: dict[str, Path]
) -> None:
    messages = [
        ChatMessage(role="system", content="You answer briefly."),
        ChatMessage(role="user", content="What is the capital of France?"),
        ChatMessage(role="assistant", content="Paris."),
        ChatMessage(role="user", content="And of Germany?"),
    ]
    # The reference rendering: transformers' own chat template code, with the source model's tokenizer.
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny_sources["generative"])  # type: ignore[no-untyped-call]
    rendered = hf_tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str) and rendered.endswith("<|im_start|>assistant\n")
    prompt_tokens = len(hf_tokenizer(rendered, add_special_tokens=False).input_ids)

    params = SamplingParams(max_tokens=12)
    chat = served(tiny_triton, params, messages=messages)
    raw = served(tiny_triton, params, prompt=rendered)
    assert chat[-1].prompt_tokens == raw[-1].prompt_tokens == prompt_tokens
    assert text_of(chat) == text_of(raw)
    assert chat[-1].completion_tokens == 12


def scalar(name: str, text: str | bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_))
    return tensor


def first_stream_error(
    client: grpcclient.InferenceServerClient, model: str, inputs: list[grpcclient.InferInput]
) -> str:
    """The error message of a streamed request that must fail before generating anything."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs)
        result, error = responses.get(timeout=60)
    finally:
        # Not cancelled: a stream cancelled after its last response can keep Triton 2.51 from unloading the model.
        client.stop_stream()
    assert error is not None, f"expected an error, got {result.as_numpy('TEXT')}"
    return str(error.message())


LONG_PROMPT = "word " * 2100  # about 2100 tokens: over both windows (2048 and 256)
GREEDY = '{"max_tokens": 4}'

BAD_INPUTS: list[tuple[str, list[tuple[str, str | bytes]], str]] = [
    ("neither", [("PARAMETERS", GREEDY)], "give exactly one of PROMPT and MESSAGES"),
    ("both", [("PROMPT", "Hi"), ("MESSAGES", '[{"role": "user", "content": "Hi"}]')], "give exactly one of PROMPT"),
    ("messages-not-json", [("MESSAGES", '[{"role": "user"')], "MESSAGES is not valid JSON"),
    ("messages-empty", [("MESSAGES", "[]")], "messages is empty"),
    ("messages-bad-role", [("MESSAGES", '[{"role": "robot", "content": "Hi"}]')], "messages[0]: role must be one of"),
    (
        "messages-extra-key",
        [("MESSAGES", '[{"role": "user", "content": "Hi", "name": "x"}]')],
        "messages[0] must have exactly the keys 'role' and 'content'",
    ),
    ("empty-prompt", [("PROMPT", "")], "the prompt is empty"),
    ("prompt-not-utf8", [("PROMPT", b"\xff\xfe")], "PROMPT[0] is not valid UTF-8 text"),
    ("parameters-not-json", [("PROMPT", "Hi"), ("PARAMETERS", "{max_tokens")], "PARAMETERS is not valid JSON"),
    ("parameters-not-object", [("PROMPT", "Hi"), ("PARAMETERS", "[4]")], "PARAMETERS must be a JSON object"),
    (
        "unknown-parameter",
        [("PROMPT", "Hi"), ("PARAMETERS", '{"max_tokens": 4, "beam_width": 2}')],
        "unknown generation parameters: ['beam_width']",
    ),
    (
        "temperature-too-high",
        [("PROMPT", "Hi"), ("PARAMETERS", '{"temperature": 3}')],
        "temperature must be in [0.0, 2.0]; got 3",
    ),
    (
        "max-tokens-not-integer",
        [("PROMPT", "Hi"), ("PARAMETERS", '{"max_tokens": 1.5}')],
        "max_tokens must be an integer in [1, 1048576]; got 1.5",
    ),
    ("stop-not-strings", [("PROMPT", "Hi"), ("PARAMETERS", '{"stop": [1]}')], "stop must be a list of non-empty"),
    (
        "too-many-stops",
        [("PROMPT", "Hi"), ("PARAMETERS", json.dumps({"stop": [str(i) for i in range(9)]}))],
        "at most 8 stop strings; got 9",
    ),
]


@pytest.mark.parametrize(("inputs", "message"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_get_a_clear_invalid_input_error(
    tiny_client: grpcclient.InferenceServerClient, inputs: list[tuple[str, str | bytes]], message: str
) -> None:
    error = first_stream_error(tiny_client, "generator", [scalar(name, text) for name, text in inputs])
    assert error.startswith("invalid input: "), error
    assert message in error, error


def served_raw_final(
    client: grpcclient.InferenceServerClient, model: str, inputs: list[grpcclient.InferInput]
) -> tuple[str, int, int]:
    """The finish reason and token counts of a streamed request sent straight to Triton."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs)
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            reason = result.as_numpy("FINISH_REASON")[0].decode()
            if reason:
                counts = (int(result.as_numpy("PROMPT_TOKENS")[0]), int(result.as_numpy("COMPLETION_TOKENS")[0]))
                return reason, *counts
    finally:
        client.stop_stream()


def test_an_over_long_prompt_is_refused_when_truncation_is_off(
    tiny_client: grpcclient.InferenceServerClient, tokenizer: Tokenizer
) -> None:
    tokens = len(tokenizer.encode(LONG_PROMPT, add_special_tokens=False).ids)
    assert tokens > SMALL_WINDOW
    error = first_stream_error(tiny_client, "generator_small", [scalar("PROMPT", LONG_PROMPT)])
    assert error == (
        f"invalid input: the prompt has {tokens} tokens; with max_tokens 1 it exceeds the context window of 2048 tokens"
    )
    # The default generator truncates from the start instead.
    final = served_raw_final(tiny_client, "generator", [scalar("PROMPT", LONG_PROMPT), scalar("PARAMETERS", GREEDY)])
    assert final == ("length", 256 - 4, 4)  # the prompt keeps its last 252 tokens


@pytest.mark.parametrize("messages", ["5", "true", '{"role": "user", "content": "hi"}'])
def test_messages_that_are_json_but_not_a_list_are_invalid_input(
    tiny_client: grpcclient.InferenceServerClient, messages: str
) -> None:
    error = first_stream_error(tiny_client, "generator", [scalar("MESSAGES", messages)])
    assert error == 'invalid input: MESSAGES must be a JSON list of {"role", "content"} objects'


def test_the_pool_raises_the_models_input_errors_as_invalid_argument(
    tiny_triton: TritonServer, tokenizer: Tokenizer
) -> None:
    tokens = len(tokenizer.encode(LONG_PROMPT, add_special_tokens=False).ids)
    cases: list[tuple[str, SamplingParams, dict[str, Any], str]] = [
        ("generator", SamplingParams(max_tokens=4), {"messages": []}, "messages is empty"),
        ("generator", SamplingParams(max_tokens=4), {"prompt": ""}, "the prompt is empty"),
        (
            "generator_small",
            SamplingParams(),
            {"prompt": LONG_PROMPT},
            f"the prompt has {tokens} tokens; with max_tokens 1 it exceeds the context window of 2048 tokens",
        ),
        (
            "generator_small",
            SamplingParams(max_tokens=SMALL_WINDOW),
            {"prompt": "Hi"},
            "max_tokens 2048 leaves no room for a prompt in the context window of 2048",
        ),
        # A value the orchestrator's schema refuses, sent anyway: the model's own check answers.
        (
            "generator",
            SamplingParams.model_construct(temperature=3.0),
            {"prompt": "Hi"},
            "temperature must be in [0.0, 2.0]; got 3.0",
        ),
    ]

    async def scenario() -> None:
        for generator, params, text, message in cases:
            async with pool_to(tiny_triton.endpoints.grpc_url, generator) as pool:
                with pytest.raises(InvalidArgumentError) as caught:
                    await collect(pool.generate(params, **text))
                assert str(caught.value) == message
                # The server is fine, the input is not: the endpoint's breaker stays closed.
                assert [s.breaker for s in pool.status()] == [BreakerState.closed]

    asyncio.run(scenario())


# Cancellation on generator_small: one slot, a queue of one.


def execution_count(triton: TritonServer, model: str) -> int:
    """Requests the (decoupled) model's ``execute`` has taken, i.e. handed to its engine."""
    url = f"http://{triton.endpoints.http_url}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["execution_count"])


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def assert_completed(deltas: list[GenerationDelta], max_tokens: int) -> None:
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", max_tokens)


async def release_frees_the_slot(triton: TritonServer, release: Callable[[], Awaitable[None]]) -> None:
    """While the slot holder runs: B waits in the queue and C is refused as busy. After ``release`` (the holder's
    client goes away) B runs while a yardstick generation on the other model is still running; then the slot
    and the queue are free again."""
    url = triton.endpoints.grpc_url
    async with pool_to(url, "generator_small") as pool, pool_to(url) as other:
        before = execution_count(triton, "generator_small")
        waiting = asyncio.create_task(collect(pool.generate(SamplingParams(max_tokens=5), prompt="Hello")))
        await eventually(lambda: execution_count(triton, "generator_small") > before, "B has reached the engine")
        with pytest.raises(ResourceExhaustedError, match="generator busy: 1 requests are waiting already"):
            await collect(pool.generate(SamplingParams(max_tokens=5), prompt="Bye"))
        assert not waiting.done()

        # The holder would go on for ~2000 sampled tokens; the yardstick runs 200 (on its own engine, so it
        # does not depend on the slot). B finishing first means the holder's slot was freed when it was released,
        # not when it ran out of tokens. An order of events, not a time limit.
        yardstick = other.generate(YARDSTICK, prompt="Count to a hundred")
        await anext(yardstick)
        yardstick_rest = asyncio.create_task(collect(yardstick))
        try:
            await release()
            assert_completed(await asyncio.wait_for(waiting, 120), 5)
            assert not yardstick_rest.done(), "B waited until the released holder had run out of tokens"
        finally:
            yardstick_rest.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await yardstick_rest
        assert_completed(await collect(pool.generate(SamplingParams(max_tokens=3), prompt="Again")), 3)


def test_closing_a_stream_frees_its_slot_for_the_queued_request(tiny_triton: TritonServer) -> None:
    async def scenario() -> None:
        async with pool_to(tiny_triton.endpoints.grpc_url, "generator_small") as pool:
            holder = pool.generate(HOLD, prompt=HOLD_PROMPT)
            first = await anext(holder)
            assert first.finish_reason is None
            await release_frees_the_slot(tiny_triton, holder.aclose)

    asyncio.run(scenario())


HOLDING_CLIENT = """
import sys
import numpy as np
import tritonclient.grpc as grpcclient

def scalar(name, text):
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor

client = grpcclient.InferenceServerClient(sys.argv[1])
client.start_stream(lambda result, error: print("error" if error else "delta", flush=True))
client.async_stream_infer("generator_small", [scalar("PROMPT", sys.argv[2]), scalar("PARAMETERS", sys.argv[3])])
sys.stdin.read()  # hold the stream open until killed
"""


def test_a_client_killed_mid_stream_frees_its_slot(tiny_triton: TritonServer) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDING_CLIENT, tiny_triton.endpoints.grpc_url, HOLD_PROMPT, HOLD.model_dump_json()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def kill() -> None:
        holder.kill()  # the TCP connection drops without a goodbye

    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "delta"  # it is generating
        asyncio.run(release_frees_the_slot(tiny_triton, kill))
    finally:
        holder.kill()
        holder.wait()


def triton_metrics(triton: TritonServer) -> str:
    """Triton's metrics endpoint, as Prometheus scrapes it."""
    with urllib.request.urlopen(triton.endpoints.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def test_the_generator_reports_its_queue_on_tritons_metrics(tiny_triton: TritonServer) -> None:
    served(tiny_triton, SamplingParams(max_tokens=8), prompt="Hello there")
    labels = {"model": "generator", "version": "1"}
    expected = {GeneratorMetrics.QUEUE_DEPTH: 0.0, GeneratorMetrics.RUNNING: 0.0, GeneratorMetrics.QUEUE_CAPACITY: 64.0}

    def settled() -> bool:  # the gauges are set after the step that sent the last delta
        gauges = {
            sample.name: sample.value
            for family in text_string_to_metric_families(triton_metrics(tiny_triton))
            for sample in family.samples
            if sample.labels == labels
        }
        return all(gauges.get(name) == value for name, value in expected.items())

    wait_until(settled, "the generator's gauges after its generation")
    # The names as exposed (the parser above would add _total to a counter's): those the dashboard reads exist.
    exposed = {line.split("{")[0].split(" ")[0] for line in triton_metrics(tiny_triton).splitlines()}
    assert exposed >= TRITON_SERIES, "a series of Triton's that the dashboard reads is gone"


PREFIX_COUNTERS = (GeneratorMetrics.PREFIX_HITS, GeneratorMetrics.PREFIX_MISSES, GeneratorMetrics.PREFIX_SAVED_TOKENS)


def generator_counters(triton: TritonServer, names: tuple[str, ...] = PREFIX_COUNTERS) -> dict[str, float]:
    """The counters ``names`` of the tiny ``generator`` version 1, read from the exposition as it is."""
    values = {}
    for line in triton_metrics(triton).splitlines():
        name, _, rest = line.partition("{")
        if name in names and 'model="generator"' in rest and 'version="1"' in rest:
            values[name] = float(rest.rsplit(" ", 1)[1])
    return values


def test_the_generator_counts_its_prefix_cache_hits_on_tritons_metrics(tiny_triton: TritonServer) -> None:
    prompt = "A prompt long enough to fill a few blocks of the prefix cache, and sent twice. " * 3
    served(tiny_triton, SamplingParams(max_tokens=2), prompt=prompt)
    wait_until(lambda: len(generator_counters(tiny_triton)) == 3, "the prefix cache's counters")
    before = generator_counters(tiny_triton)
    served(tiny_triton, SamplingParams(max_tokens=2), prompt=prompt)

    def counted() -> bool:
        after = generator_counters(tiny_triton)
        hits = after[GeneratorMetrics.PREFIX_HITS] - before[GeneratorMetrics.PREFIX_HITS]
        saved = after[GeneratorMetrics.PREFIX_SAVED_TOKENS] - before[GeneratorMetrics.PREFIX_SAVED_TOKENS]
        return hits == 1 and saved >= 32  # the prompt's whole blocks of 16 tokens but the last

    wait_until(counted, "a hit of the second identical prompt")


def test_the_generator_counts_its_draft_tokens_on_tritons_metrics(tiny_triton: TritonServer) -> None:
    names = (GeneratorMetrics.DRAFT_TOKENS, GeneratorMetrics.ACCEPTED_DRAFT_TOKENS)
    # A prompt whose last three tokens occurred before: the first step after it checks a draft.
    served(tiny_triton, SamplingParams(max_tokens=12), prompt="la la la " * 12)

    def counted() -> bool:
        counters = generator_counters(tiny_triton, names)
        return len(counters) == 2 and counters[names[0]] > 0

    wait_until(counted, "the draft tokens of a repetitive prompt")
    counters = generator_counters(tiny_triton, names)
    assert 0 <= counters[names[1]] <= counters[names[0]]

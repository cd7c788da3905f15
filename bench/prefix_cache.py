"""Prefix KV-cache reuse: time to first token of RAG prompts with the generator's prefix cache and without it.

Same engine (the exported SmolLM2-135M-Instruct generator, ONNX Runtime in process, ``--threads``), same
prompts, greedy, side by side in one run, each prompt alone on an idle engine:

* **RAG prompts** (bench/generate.py's: a question and 3 to 6 passages of the standard library's docs,
  rendered with the orchestrator's ``grounded_messages`` and the chat template, 300 to 800 tokens): they
  share the template and the system prompt;
* **follow-up questions**: each RAG prompt's passages with ``--follow-ups`` other questions after them, as a
  client asking more about the same retrieved context does: they share the template, the system prompt and
  the passages.

Time to first token is the time from ``submit`` to the first generated token (the prefill and one sampling
step). With the cache, the first prompt of each set warms it and is not counted. Outputs are compared token
for token (``--max-tokens`` greedy tokens). The report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from corpus import passage_pools
from generate import build_prompts, question, topics
from stack import machine, markdown_table, model_repository, progress, version_dir

from tritonrag.clients.wire.schema import ChatMessage
from tritonrag.export.runtime.engine import GenerationEngine, GenerationRequest
from tritonrag.export.runtime.sampling import SamplingParams
from tritonrag.server.generation.packing import ContextWindow


def first_token_seconds(engine: GenerationEngine, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Seconds from submit to the first token on an idle engine, and the greedy tokens of the whole run."""
    request = GenerationRequest(list(ids), SamplingParams(max_tokens=max_tokens), lambda *_: None)
    started = time.perf_counter()
    engine.submit(request)
    while not request.generated:
        engine.step()
    first = time.perf_counter() - started
    engine.run_until_idle()
    return first, request.generated


def common_prefix(prompts: Sequence[list[int]]) -> int:
    """Tokens every prompt of ``prompts`` starts with."""
    length = 0
    for column in zip(*prompts, strict=False):
        if len(set(column)) > 1:
            break
        length += 1
    return length


def follow_ups(window: ContextWindow, messages: list[ChatMessage], questions: Sequence[str]) -> list[list[int]]:
    """The prompt of ``messages`` asked again with each of ``questions`` after the same passages."""
    system, user = messages
    passages = user.content.rsplit("\n\n", 1)[0]
    prompts = []
    for text in questions:
        asked = [system, ChatMessage(role="user", content=f"{passages}\n\nQuestion: {text}")]
        prompts.append(list(window.tokenizer.encode(window.render(asked), add_special_tokens=False).ids))
    return prompts


def measure(generator: Path, prompt_sets: dict[str, list[list[int]]], threads: int, max_tokens: int) -> list[list[str]]:
    rows = []
    for name, prompts in prompt_sets.items():
        results = {}
        for cached in (False, True):
            engine = GenerationEngine.from_version_dir(
                generator, threads=threads, prefix_cache_bytes=(512 * 2**20 if cached else 0)
            )
            first_token_seconds(engine, prompts[0], max_tokens)  # warms ONNX Runtime (and the cache)
            timings, outputs = [], []
            for ids in prompts[1:]:
                seconds, tokens = first_token_seconds(engine, ids, max_tokens)
                timings.append(seconds)
                outputs.append(tokens)
            saved = engine.prefix_cache.stats.saved_tokens if engine.prefix_cache is not None else 0
            results[cached] = (statistics.median(timings), outputs, saved)
            progress(f"{name}, cache {cached}: median {results[cached][0] * 1000:.0f} ms")
        (plain, plain_out, _), (fast, fast_out, saved) = results[False], results[True]
        tokens = [len(p) for p in prompts[1:]]
        rows.append(
            [
                name,
                str(len(prompts) - 1),
                f"{statistics.median(tokens):.0f}",
                str(common_prefix(prompts)),
                f"{saved / (len(prompts) - 1):.0f}",
                f"{plain * 1000:.0f}",
                f"{fast * 1000:.0f}",
                f"{(1 - fast / plain) * 100:.0f}%",
                "yes" if plain_out == fast_out else "NO",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--prompts", type=int, default=9, help="RAG prompts (the first warms the engine)")
    parser.add_argument("--follow-ups", type=int, default=8, help="questions asked again over one prompt's passages")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt, compared")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = version_dir(model_repository(args.repository, ["generator"]), "generator")
    window = ContextWindow.from_version_dir(generator)
    pool = topics(passage_pools(), args.seed)
    prompts = build_prompts(window, pool, args.prompts, args.seed)
    questions = [question(p) for p in pool[-args.follow_ups - 1 :]]
    prompt_sets = {
        "RAG prompts (shared template and system prompt)": [p.ids for p in prompts],
        "follow-up questions (shared passages too)": follow_ups(window, prompts[0].messages, questions),
    }
    started = time.monotonic()
    rows = measure(generator, prompt_sets, args.threads, args.max_tokens)
    header = [
        "prompts",
        "measured",
        "tokens (median)",
        "shared prefix",
        "reused per prompt",
        "TTFT no cache ms",
        "TTFT cache ms",
        "lower by",
        "same tokens",
    ]
    print(f"## Prefix KV-cache reuse ({machine()}, {args.threads} threads, {time.monotonic() - started:.0f} s)\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()

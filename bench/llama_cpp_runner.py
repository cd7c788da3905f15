"""Greedy generations with llama.cpp, run by bench/llama_baseline.py inside its scratch environment.

Reads a JSON job on stdin (``model``: a GGUF file, ``prompts``: token ids, ``max_tokens``, ``stop_ids``,
``threads``, ``n_ctx``, ``prompt_lookup_tokens``: draft tokens of llama-cpp-python's prompt lookup decoding, 0 for
none) and writes one JSON result per prompt on stdout: the completion's token ids, its
text (without the stop token) and the times of each token after the start, in seconds. Imports only the
standard library and ``llama_cpp``: the project is not installed there.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding


def generate(llm: Llama, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> dict[str, Any]:
    """One greedy completion of ``prompt``; llama-cpp-python keeps the KV of the prefix it shares with the last."""
    started = time.perf_counter()
    tokens: list[int] = []
    times: list[float] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        times.append(time.perf_counter() - started)
        if token in stop_ids or len(tokens) >= max_tokens:
            break
    shown = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
    text = llm.detokenize(shown).decode("utf-8", errors="replace")
    return {"tokens": tokens, "text": text, "times": times}


def main() -> None:
    job = json.load(sys.stdin)
    lookup = job.get("prompt_lookup_tokens", 0)
    llm = Llama(
        model_path=job["model"],
        n_ctx=job["n_ctx"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_batch=512,
        verbose=False,
        # Speculative decoding with drafts from the prompt, as the served engine's (tails of 3 tokens). It needs
        # every position's logits, and llama-cpp-python 0.3.36 sizes their buffer for that only when asked here.
        draft_model=LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=lookup) if lookup else None,
        logits_all=bool(lookup),
    )
    stop_ids = set(job["stop_ids"])
    generate(llm, job["prompts"][0], 8, stop_ids)  # warm-up
    llm.reset()  # forget the warm-up prompt: the first prompt is prefilled in full, as on the served side
    for prompt in job["prompts"]:
        print(json.dumps(generate(llm, prompt, job["max_tokens"], stop_ids)), flush=True)


if __name__ == "__main__":
    main()

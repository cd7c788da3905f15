"""llama.cpp as a baseline: ``llama-cpp-python`` built into a scratch environment, run on the same GGUF file.

The environment (``.cache/llama-cpp-venv``) is made on first use and reused: llama-cpp-python builds
llama.cpp from source, for this CPU's vector extensions named explicitly (``GGML_NATIVE=OFF``; a native
build can pick instructions that crash under some hypervisors). The project never imports llama_cpp:
``llama_cpp_runner.py`` runs in that environment, prompts and results go as JSON through a pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stack import CACHE, progress

VERSION = "0.3.36"
ENVIRONMENT = CACHE / "llama-cpp-venv"
RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
# GGML option for each /proc/cpuinfo flag that llama.cpp can use.
CPU_OPTIONS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx512f": "GGML_AVX512",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx512vbmi": "GGML_AVX512_VBMI",
}


@dataclass(frozen=True)
class LlamaGeneration:
    """One completion: its token ids, its text without the stop token, each token's time after the start (s)."""

    tokens: list[int]
    text: str
    times: list[float]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def python() -> Path:
    """The scratch environment's interpreter, with llama-cpp-python ``VERSION`` built on first use (minutes)."""
    interpreter: Path = ENVIRONMENT / "bin" / "python"
    if interpreter.is_file():
        found = subprocess.run(
            [interpreter, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            check=False,
            capture_output=True,
            text=True,
        )
        if found.returncode == 0 and found.stdout.strip() == VERSION:
            return interpreter
    progress(f"building llama-cpp-python {VERSION} into {ENVIRONMENT} (minutes)")
    venv.create(ENVIRONMENT, with_pip=True, clear=True)
    flags = cpu_flags()
    options = [
        "-DGGML_NATIVE=OFF",
        *(f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in CPU_OPTIONS.items()),
    ]
    env = {**os.environ, "CMAKE_ARGS": " ".join(options), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    subprocess.run([interpreter, "-m", "pip", "install", "-q", f"llama-cpp-python=={VERSION}"], env=env, check=True)
    return interpreter


def generate(
    gguf: Path,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    stop_ids: Sequence[int],
    threads: int,
    n_ctx: int,
    prompt_lookup_tokens: int = 0,
) -> list[LlamaGeneration]:
    """Greedy completions of ``prompts`` (token ids), one after another, with ``threads`` threads; with
    ``prompt_lookup_tokens``, speculative decoding on drafts of that many tokens from the prompt."""
    job: dict[str, Any] = {
        "model": str(gguf),
        "prompts": [list(p) for p in prompts],
        "max_tokens": max_tokens,
        "stop_ids": list(stop_ids),
        "threads": threads,
        "n_ctx": n_ctx,
        "prompt_lookup_tokens": prompt_lookup_tokens,
    }
    done = subprocess.run([python(), RUNNER], input=json.dumps(job), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"llama.cpp runner failed with exit code {done.returncode}")
    return [LlamaGeneration(**json.loads(line)) for line in done.stdout.splitlines() if line.strip()]

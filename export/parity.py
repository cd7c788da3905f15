"""Export-time parity: the ONNX graph under ONNX Runtime against the PyTorch reference, on real texts.

The texts have different lengths and run as one right-padded batch, tokenised by the same code the
Triton models use (``tritonrag.export.runtime.encoding``), so padding and prompts are checked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from .errors import ExportError
from .graphs import Task
from .runtime.encoding import ModelTokenizer

SENTENCES = (
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Rain is expected tomorrow afternoon, so bring an umbrella if you are going out.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Good morning!",
    "The committee postponed its decision on the new railway line until the environmental review, "
    "which had been delayed twice already, was finally published in the spring.",
    "How many moons does Jupiter have?",
    "She plays the violin in a small orchestra every Thursday evening.",
)
# Two passages per query: one that answers it, one that does not.
PAIRS = (
    ("What is the capital of France?", "Paris is the capital and largest city of France, on the river Seine."),
    ("What is the capital of France?", "The Great Barrier Reef lies off the coast of Queensland in Australia."),
    (
        "How do vaccines work?",
        "Vaccines train the immune system to recognise a pathogen by exposing it to a harmless piece or a "
        "weakened form of it, so that the body can respond quickly to a real infection later.",
    ),
    ("How do vaccines work?", "The stock market closed higher on Friday."),
    ("When did Apollo 11 land on the Moon?", "Apollo 11 landed on the Moon on 20 July 1969."),
    ("When did Apollo 11 land on the Moon?", "Photosynthesis converts light energy into chemical energy."),
)


@dataclass(frozen=True)
class ParityThresholds:
    """Limits that fail an export: embedder cosine minima (float32 and int8), reranker max-abs-diff (float32)."""

    cosine_min: float = 0.9999
    max_abs_diff: float = 1e-3
    # Dynamic int8 quantises each activation with one scale per batch, so a vector moves with its batch
    # mates: MiniLM's int8 graph reaches min cosine 0.988 on the parity texts (0.988 over 2,000 real
    # chunks, mean 0.995; docs/BENCHMARKS.md), while a broken quantisation falls far lower (static
    # MinMax QDQ: 0.83). The gate catches the latter; retrieval quality is measured by bench/ingest.py.
    int8_cosine_min: float = 0.98


def _spearman(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _measure(task: Task, reference: npt.NDArray[np.float32], candidate: npt.NDArray[np.float32]) -> dict[str, Any]:
    if task == "embedder":
        norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
        cosine = (reference * candidate).sum(axis=1) / norms
        return {"metric": "cosine_min", "value": float(cosine.min()), "rows": len(reference)}
    ref, got = reference.reshape(-1), candidate.reshape(-1)
    return {
        "metric": "max_abs_diff",
        "value": float(np.abs(ref - got).max()),
        "same_order": bool((np.argsort(ref) == np.argsort(got)).all()),
        "spearman": _spearman(ref, got),
        "rows": len(ref),
    }


class ParityCheck:
    """PyTorch reference outputs for the parity texts, compared with an ONNX file's outputs.

    Each report also has ``alone_vs_batched``: the same metric between each row run alone and in the
    padded batch. A float32 graph must not depend on padding; a dynamically quantised one does, since
    one activation scale covers the whole batch.
    """

    def __init__(self, task: Task, graph: nn.Module, tokenizer: ModelTokenizer, thresholds: ParityThresholds) -> None:
        self.task = task
        self.thresholds = thresholds
        self.tokenizer = tokenizer
        if task == "embedder":
            self.encodings = [tokenizer.encode_text(text) for text in SENTENCES]
        else:
            self.encodings = [tokenizer.encode_pair(query, passage) for query, passage in PAIRS]
        self.inputs = tokenizer.pad(self.encodings)
        with torch.inference_mode():
            self.reference: npt.NDArray[np.float32] = graph(**self.torch_inputs()).numpy()

    def torch_inputs(self) -> dict[str, torch.Tensor]:
        """The padded parity batch as torch tensors, in the graph's input order (also the export example)."""
        return {name: torch.from_numpy(array) for name, array in self.inputs.items()}

    def _report(self, onnx_file: Path) -> dict[str, Any]:
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        batched: npt.NDArray[np.float32] = session.run(None, self.inputs)[0]
        alone = np.concatenate([session.run(None, self.tokenizer.pad([e]))[0] for e in self.encodings])
        report = _measure(self.task, self.reference, batched)
        report["alone_vs_batched"] = _measure(self.task, batched, alone)["value"]
        return report

    def check(self, onnx_file: Path) -> dict[str, Any]:
        """Float32 parity; raises ``ExportError`` when the graph disagrees with PyTorch or depends on padding."""
        report = self._report(onnx_file)
        values = (report["value"], report["alone_vs_batched"])
        if self.task == "embedder":
            report["threshold"] = self.thresholds.cosine_min
            failed = min(values) < self.thresholds.cosine_min
        else:
            report["threshold"] = self.thresholds.max_abs_diff
            failed = max(values) > self.thresholds.max_abs_diff or not report["same_order"]
        if failed:
            raise ExportError(f"{onnx_file.name} disagrees with the PyTorch reference or depends on padding: {report}")
        return report

    def check_quantized(self, onnx_file: Path) -> dict[str, Any]:
        """Int8 parity; raises for an embedder under ``int8_cosine_min``, only reports for a reranker."""
        report = self._report(onnx_file)
        report["threshold"] = self.thresholds.int8_cosine_min if self.task == "embedder" else None
        if self.task == "embedder" and report["value"] < self.thresholds.int8_cosine_min:
            raise ExportError(f"int8 {onnx_file.name} is too far from the PyTorch reference: {report}")
        return report

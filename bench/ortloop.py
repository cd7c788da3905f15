"""The in-process baseline of the ingestion benchmarks: a model version embedded in a plain ONNX Runtime loop.

``OrtLoop`` reads a version directory as Triton does (``model.onnx``, ``tokenizer.json``,
``tritonrag.json``), tokenises all texts in one ``encode_batch`` call (the Rust tokenizer's threads,
truncating at the version's limit), sorts them by length and cuts them into batches of at most
``max_tokens`` padded tokens, and runs them with ONNX Runtime on every core (``intra_op_num_threads``
= the machine's cores, default graph optimisations; ``spinning=False`` stops idle pool threads from
spinning, which costs much throughput when other processes load the cores). Tokenising, sorting and padding are inside
the measured time; the embeddings come back in input order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from tritonrag.export.runtime.contract import ONNX_FILE, TOKENIZER_FILE
from tritonrag.export.runtime.encoding import Encoding, ModelMetadata, ModelTokenizer
from tritonrag.export.runtime.inference import sub_batches

Embeddings = npt.NDArray[np.float32]
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_ROWS = 256


@dataclass(frozen=True)
class LoopRun:
    """One pass over the texts: wall seconds, the embeddings (input order), and how the batches were cut."""

    seconds: float
    embeddings: Embeddings
    batches: int
    tokens: int  # real tokens, special tokens included
    padded_tokens: int  # tokens run, padding included

    @property
    def rate(self) -> float:
        """Texts per second."""
        return len(self.embeddings) / self.seconds


class OrtLoop:
    """Embeds texts with one version directory's graph and tokenizer, in length-sorted token-budgeted batches."""

    def __init__(
        self,
        version_dir: Path,
        threads: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_rows: int = DEFAULT_MAX_ROWS,
        onnx_file: Path | None = None,
        spinning: bool = True,
    ) -> None:
        self.version_dir = version_dir
        self.metadata = ModelMetadata.read(version_dir)
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        self.padding = ModelTokenizer.from_version_dir(version_dir)  # pads rows as the served model does
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.metadata.max_sequence_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.threads = options.intra_op_num_threads
        if not spinning:  # idle pool threads sleep instead of spinning: better when other processes want the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = onnx_file or version_dir / ONNX_FILE
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Token rows of ``texts``, truncated at the version's limit."""
        return [Encoding(row.ids, row.type_ids) for row in self.tokenizer.encode_batch(list(texts))]

    def run(self, texts: Sequence[str]) -> LoopRun:
        """Embed every text; the wall time covers tokenising, sorting, padding and ONNX Runtime."""
        start = time.perf_counter()
        rows = self.encode(texts)
        lengths = [len(row.ids) for row in rows]
        batches = sub_batches(lengths, self.max_rows, self.max_tokens)
        output: Embeddings | None = None
        padded = 0
        for batch in batches:
            result: Embeddings = self.session.run(None, self.padding.pad([rows[i] for i in batch]))[0]
            if output is None:
                output = np.empty((len(texts), result.shape[1]), dtype=np.float32)
            output[batch] = result
            padded += len(batch) * max(lengths[i] for i in batch)
        seconds = time.perf_counter() - start
        if output is None:
            output = np.empty((0, 0), dtype=np.float32)
        return LoopRun(seconds, output, len(batches), sum(lengths), padded)


def cosines(reference: Embeddings, candidate: Embeddings) -> npt.NDArray[np.float64]:
    """Row-wise cosine similarity of two embedding matrices."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    result: npt.NDArray[np.float64] = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result

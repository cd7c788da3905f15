"""Running an ONNX session over tokenised rows: provider choice and length-sorted sub-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .encoding import Encoding, ModelTokenizer

_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def execution_providers(device_id: int, gpu: bool, cache_dir: Path) -> list[Any]:
    """TensorRT, then CUDA, then CPU: those of them this ONNX Runtime build has."""
    available = set(ort.get_available_providers())
    providers: list[Any] = []
    for name in _PREFERRED_PROVIDERS:
        if name not in available or (name != "CPUExecutionProvider" and not gpu):
            continue
        if name == "TensorrtExecutionProvider":
            options = {"device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
            providers.append((name, options))
        elif name == "CUDAExecutionProvider":
            providers.append((name, {"device_id": device_id}))
        else:
            providers.append(name)
    return providers


def sub_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices sorted by length, cut so that rows * longest ≤ ``max_tokens`` and rows ≤ ``max_rows``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # ascending order: the newest row is the longest
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class CancelledError(Exception):
    """Every request of the batch was cancelled by its client; the rest of the work was not done."""


class SortedBatchRunner:
    """Runs rows through a session in length-sorted sub-batches and returns outputs in input order."""

    def __init__(
        self, session: ort.InferenceSession, tokenizer: ModelTokenizer, max_rows: int, max_tokens: int
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.max_tokens = max_tokens

    def run(
        self, encodings: Sequence[Encoding], cancelled: Callable[[], bool] = lambda: False
    ) -> npt.NDArray[np.float32]:
        """The graph's first output for each row, stacked in the order of ``encodings``.

        ``cancelled`` is asked before each sub-batch: when it says so, ``CancelledError`` ends the work.
        """
        lengths = [len(e.ids) for e in encodings]
        outputs: dict[int, npt.NDArray[np.float32]] = {}
        for batch in sub_batches(lengths, self.max_rows, self.max_tokens):
            if cancelled():
                raise CancelledError(f"cancelled after {len(outputs)} of {len(encodings)} rows")
            result = self.session.run(None, self.tokenizer.pad([encodings[i] for i in batch]))[0]
            outputs.update(zip(batch, result, strict=True))
        stacked: npt.NDArray[np.float32] = np.stack([outputs[i] for i in range(len(encodings))]).astype(np.float32)
        return stacked

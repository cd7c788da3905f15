"""The Triton Python-backend model shared by the embedder and the reranker.

Triton's dynamic batcher hands ``execute`` a list of requests. Each request may carry
several rows. Rows from all valid requests are tokenised, sorted by length and cut into
sub-batches under a padded-token budget, so that each ONNX Runtime call pads only to the
longest row of its own sub-batch. A request with bad input gets an error response of its
own; the others in the batch are answered normally.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from .encoding import Encoding, InputError, ModelTokenizer
from .inference import SortedBatchRunner, execution_providers


def decode_strings(request: Any, name: str) -> list[str]:
    """The rows of a string input as text; bytes that are not UTF-8 are an input error."""
    array = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
    rows = []
    for row, value in enumerate(array):
        try:
            rows.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError as exc:
            raise InputError(f"{name}[{row}] is not valid UTF-8 text") from exc
    return rows


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return str(value) if value not in (None, "") else default


class TextModel(ABC):
    """A text-in ONNX model served by Triton's Python backend."""

    output_name: str

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer and an ONNX Runtime session from this version's directory."""
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = ModelTokenizer.from_version_dir(version_dir)
        self.truncate = _parameter(config, "truncate", "true").lower() == "true"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "0"))
        gpu = args.get("model_instance_kind") == "GPU"
        providers = execution_providers(int(args.get("model_instance_device_id", "0")), gpu, version_dir / "trt_cache")
        session = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=providers)
        self.runner = SortedBatchRunner(
            session,
            self.tokenizer,
            max_rows=int(config.get("max_batch_size") or 1),
            max_tokens=int(_parameter(config, "max_batch_tokens", "16384")),
        )

    @abstractmethod
    def encode_request(self, request: Any) -> list[Encoding]:
        """Token rows of one request; raises ``InputError`` for bad input."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; bad requests get an INVALID_ARG error response."""
        encoded: list[list[Encoding] | InputError] = []
        for request in requests:
            try:
                encoded.append(self.encode_request(request))
            except InputError as exc:
                encoded.append(exc)
        rows = [e for item in encoded if not isinstance(item, InputError) for e in item]
        values = self.runner.run(rows) if rows else np.zeros((0,), dtype=np.float32)
        responses = []
        start = 0
        for item in encoded:
            if isinstance(item, InputError):
                error = pb_utils.TritonError(str(item), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            chunk = values[start : start + len(item)].reshape(len(item), -1)
            start += len(item)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, chunk)]))
        return responses

    def finalize(self) -> None:
        """Release the ONNX Runtime session."""
        del self.runner

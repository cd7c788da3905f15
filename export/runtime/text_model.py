"""The Triton Python-backend models of the exported text-in models (embedder, reranker, native tokenizer).

Triton's dynamic batcher hands ``execute`` a list of requests. Each request may carry
several rows. Rows from all valid requests are tokenised, sorted by length and cut into
sub-batches under a padded-token budget, so that each ONNX Runtime call pads only to the
longest row of its own sub-batch. A request with bad input gets an error response of its
own; the others in the batch are answered normally.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from .contract import BULK_REQUEST_PARAMETER, ONNX_FILE, EmbedderTensors, Parameters, RerankerTensors
from .encoding import Encoding, InputError, ModelTokenizer
from .inference import CancelledError, SortedBatchRunner, execution_providers


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


def model_parameter(config: dict[str, Any], key: str, default: str) -> str:
    """A string parameter of the model's ``config.pbtxt`` (``default`` when absent or empty)."""
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return str(value) if value not in (None, "") else default


def encode_texts(tokenizer: ModelTokenizer, request: Any, truncate: bool) -> list[Encoding]:
    """Token rows of an embedder request (``TEXT``)."""
    encodings = []
    for row, text in enumerate(decode_strings(request, EmbedderTensors.TEXT)):
        try:
            encodings.append(tokenizer.encode_text(text, truncate=truncate))
        except InputError as exc:
            raise InputError(f"TEXT[{row}]: {exc}") from exc
    return encodings


def encode_pairs(tokenizer: ModelTokenizer, request: Any, truncate: bool) -> list[Encoding]:
    """Token rows of a reranker request (``QUERY`` and ``PASSAGE``, row by row)."""
    queries, passages = decode_strings(request, RerankerTensors.QUERY), decode_strings(request, RerankerTensors.PASSAGE)
    if len(queries) != len(passages):
        raise InputError(f"QUERY has {len(queries)} rows but PASSAGE has {len(passages)}; they must match")
    encodings = []
    for row, (query, passage) in enumerate(zip(queries, passages, strict=True)):
        try:
            encodings.append(tokenizer.encode_pair(query, passage, truncate=truncate))
        except InputError as exc:
            raise InputError(f"row {row}: {exc}") from exc
    return encodings


REQUEST_ENCODERS: dict[str, Callable[[ModelTokenizer, Any, bool], list[Encoding]]] = {
    "embedder": encode_texts,
    "reranker": encode_pairs,
}
OUTPUT_NAMES = {"embedder": EmbedderTensors.EMBEDDING, "reranker": RerankerTensors.SCORE}


def is_bulk(request: Any) -> bool:
    """Whether the orchestrator marked ``request`` as bulk work (``BULK_REQUEST_PARAMETER``)."""
    return bool(json.loads(request.parameters() or "{}").get(BULK_REQUEST_PARAMETER))


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread (on Linux, a task of its own) the nice value ``nice``; raising it needs no
    privilege, and the operating system then runs the other instances' normal-priority threads first."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def error_response(error: InputError) -> Any:
    """An INVALID_ARG response for one bad request."""
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
    )


class TokenizingModel:
    """A Python-backend model that tokenises its requests as this version's task requires."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the tokenizer and metadata of this version, and the model's parameters."""
        self.config = json.loads(args["model_config"])
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = ModelTokenizer.from_version_dir(self.version_dir)
        self.truncate = model_parameter(self.config, Parameters.TRUNCATE, "true").lower() == "true"
        self._encode = REQUEST_ENCODERS[self.tokenizer.metadata.task]

    def encode_all(self, requests: list[Any]) -> list[list[Encoding] | InputError]:
        """Each request's token rows, or the input error that makes it bad."""
        encoded: list[list[Encoding] | InputError] = []
        for request in requests:
            try:
                encoded.append(self._encode(self.tokenizer, request, self.truncate))
            except InputError as exc:
                encoded.append(exc)
        return encoded


class TextModel(TokenizingModel):
    """A text-in ONNX model: the whole dynamic batch in length-sorted sub-batches, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Also load an ONNX Runtime session on the best execution provider present."""
        super().initialize(args)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(model_parameter(self.config, Parameters.INTRA_OP_THREADS, "0"))
        gpu = args.get("model_instance_kind") == "GPU"
        device = int(args.get("model_instance_device_id", "0"))
        providers = execution_providers(device, gpu, self.version_dir / "trt_cache")
        session = ort.InferenceSession(str(self.version_dir / ONNX_FILE), options, providers=providers)
        self.output_name = OUTPUT_NAMES[self.tokenizer.metadata.task]
        self.runner = SortedBatchRunner(
            session,
            self.tokenizer,
            max_rows=int(self.config.get("max_batch_size") or 1),
            max_tokens=int(model_parameter(self.config, Parameters.MAX_BATCH_TOKENS, "16384")),
        )
        # Batches of bulk work run on a thread of lower priority. Triton runs one batch per instance at a time,
        # so while the other instances ingest, the instance that takes a search's embedding gets a core at once
        # instead of a third of two; the operating system decides, and no privilege is needed.
        nice = int(model_parameter(self.config, Parameters.BULK_NICE, "0"))
        self.bulk_thread = (
            ThreadPoolExecutor(1, "bulk", initializer=lower_thread_priority, initargs=(nice,)) if nice > 0 else None
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; bad requests get an INVALID_ARG error response.

        A batch made only of bulk requests is computed on the bulk thread. Between sub-batches the model asks
        whether every request's client has gone; then it stops, and each request gets a CANCELLED error
        response.
        """
        if self.bulk_thread is not None and all(is_bulk(r) for r in requests):
            encoded, values = self.bulk_thread.submit(self.compute, requests).result()
        else:
            encoded, values = self.compute(requests)
        if isinstance(values, CancelledError):
            error = pb_utils.TritonError(
                str(values), getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)
            )
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for item in encoded:
            if isinstance(item, InputError):
                responses.append(error_response(item))
                continue
            chunk = values[start : start + len(item)].reshape(len(item), -1)
            start += len(item)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, chunk)]))
        return responses

    def compute(
        self, requests: list[Any]
    ) -> tuple[list[list[Encoding] | InputError], npt.NDArray[np.float32] | CancelledError]:
        """Each request's token rows (or its input error), and the outputs of the valid rows in that order (or
        the `CancelledError` that stopped them)."""
        encoded = self.encode_all(requests)
        rows = [e for item in encoded if not isinstance(item, InputError) for e in item]
        if not rows:
            return encoded, np.zeros((0,), dtype=np.float32)
        try:
            return encoded, self.runner.run(rows, lambda: all(r.is_cancelled() for r in requests))
        except CancelledError as exc:
            return encoded, exc

    def finalize(self) -> None:
        """Stop the bulk thread and release the ONNX Runtime session."""
        if self.bulk_thread is not None:
            self.bulk_thread.shutdown()
        del self.runner

"""The Triton Python-backend model of an exported generator: decoupled, continuously batched.

``execute`` only validates and queues requests (the model is decoupled, so it returns at once);
a background thread runs the ``GenerationEngine``, which streams each request's text through the
request's response sender, one response per step that produced text, the last one flagged final.
A request whose client went away (Triton marks it cancelled) leaves the batch at the next step.
See ``generation`` for the inputs and outputs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
from tokenizers import Tokenizer

from .chat import ChatTemplate
from .contract import BUSY_ERROR, INPUT_ERROR, TOKENIZER_FILE, GeneratorMetrics, GeneratorTensors, Parameters
from .encoding import InputError, ModelMetadata
from .engine import BusyError, FinishReason, GenerationEngine, GenerationRequest
from .sampling import SamplingParams
from .text_model import decode_strings, model_parameter

log = logging.getLogger(__name__)


def _optional_text(request: Any, name: str) -> str | None:
    if pb_utils.get_input_tensor_by_name(request, name) is None:
        return None
    rows = decode_strings(request, name)
    if len(rows) != 1:
        raise InputError(f"{name} must hold exactly one string; it has {len(rows)}")
    return rows[0]


class _Stream:
    """Sends one request's deltas through its response sender; a failed send marks the client gone."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self.gone = False

    def is_cancelled(self) -> bool:
        return self.gone or bool(self.request.is_cancelled())

    def emit(self, text: str, reason: FinishReason | None, prompt_tokens: int, completion_tokens: int) -> None:
        outputs = [
            pb_utils.Tensor(GeneratorTensors.TEXT, np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor(GeneratorTensors.FINISH_REASON, np.array([(reason or "").encode()], dtype=np.object_)),
            pb_utils.Tensor(GeneratorTensors.PROMPT_TOKENS, np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor(GeneratorTensors.COMPLETION_TOKENS, np.array([completion_tokens], dtype=np.int32)),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if reason else 0
        self._send(pb_utils.InferenceResponse(output_tensors=outputs), flags)

    def fail(self, message: str, code: Any = None) -> None:
        """End the request with an error response (INTERNAL unless ``code`` says otherwise)."""
        error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL if code is None else code)
        self._send(
            pb_utils.InferenceResponse(output_tensors=[], error=error), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )

    def _send(self, response: Any, flags: int) -> None:
        try:
            self.sender.send(response, flags=flags)
        except Exception as exc:  # the client's stream is gone; the engine drops the sequence next step
            if not self.gone:
                log.info("generator: a response could not be sent (%s); cancelling the request", exc)
            self.gone = True


class _LoadGauges:
    """The engine's waiting and running sequences as Triton custom metrics, sent only when they change, and
    its queue's capacity."""

    def __init__(self, model: str, version: str, queue_capacity: int) -> None:
        families = {
            GeneratorMetrics.QUEUE_DEPTH: "Requests waiting for a sequence slot",
            GeneratorMetrics.RUNNING: "Sequences in the running batch",
            GeneratorMetrics.QUEUE_CAPACITY: "The most requests that may wait (max_queue); more are refused",
        }
        # Kept for the model's life: a metric leaves Triton's endpoint with its object, and a family must
        # outlive its metrics.
        self._families = [
            pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
            for name, text in families.items()
        ]
        labels = {"model": model, "version": version}
        *self._gauges, self._capacity = [family.Metric(labels=labels) for family in self._families]
        self._capacity.set(queue_capacity)
        self._last = (-1, -1)

    def set(self, waiting: int, running: int) -> None:
        if (waiting, running) != self._last:
            self._last = (waiting, running)
            for gauge, value in zip(self._gauges, self._last, strict=True):
                gauge.set(value)


class _Counters:
    """Totals the engine keeps (``families``: name and description) as Triton custom counters."""

    def __init__(self, model: str, version: str, families: dict[str, str]) -> None:
        self._families = [  # kept for the model's life, as _LoadGauges' are
            pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
            for name, text in families.items()
        ]
        labels = {"model": model, "version": version}
        self._counters = [family.Metric(labels=labels) for family in self._families]
        self._last = [0] * len(families)

    def update(self, totals: Sequence[int]) -> None:
        """Add what the totals (in ``families``' order) counted since the last update."""
        for counter, value, last in zip(self._counters, totals, self._last, strict=True):
            if value > last:
                counter.increment(value - last)
        self._last = list(totals)


class TritonPythonModel:
    """A decoupled generator: requests join the running batch at the next step and stream their text."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the decoder, tokenizer and chat template; start the batching loop."""
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the generator must be decoupled (model_transaction_policy)")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        metadata = ModelMetadata.read(version_dir)
        gpu = args.get("model_instance_kind") == "GPU"
        self.engine = GenerationEngine.from_version_dir(
            version_dir,
            threads=int(model_parameter(config, Parameters.INTRA_OP_THREADS, "0")),
            gpu_device=int(args.get("model_instance_device_id", "0")) if gpu else None,
            max_sequences=int(model_parameter(config, Parameters.MAX_SEQUENCES, "16")),
            max_kv_tokens=int(model_parameter(config, Parameters.MAX_KV_TOKENS, "32768")),
            max_queue=int(model_parameter(config, Parameters.MAX_QUEUE, "64")),
            truncate_prompt=model_parameter(config, Parameters.TRUNCATE_PROMPT, "true").lower() == "true",
            prefix_cache_bytes=int(model_parameter(config, Parameters.PREFIX_CACHE_MB, "256")) * 2**20,
            prefill_chunk_tokens=int(model_parameter(config, Parameters.PREFILL_CHUNK_TOKENS, "256")),
            speculative_tokens=int(model_parameter(config, Parameters.SPECULATIVE_TOKENS, "8")),
        )
        self.tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        template = metadata.extra.get("chat_template")
        extra = metadata.extra
        self.chat = ChatTemplate(template, extra.get("bos_token", ""), extra.get("eos_token", "")) if template else None
        self._stop = threading.Event()
        self._load = _LoadGauges(args["model_name"], args["model_version"], self.engine.limits.max_queue)
        model, version = args["model_name"], args["model_version"]
        self._prefix = _Counters(
            model,
            version,
            {
                GeneratorMetrics.PREFIX_HITS: "Prompts whose beginning was found in the prefix cache",
                GeneratorMetrics.PREFIX_MISSES: "Prompts whose beginning was not in the prefix cache",
                GeneratorMetrics.PREFIX_SAVED_TOKENS: "Prompt tokens not prefilled thanks to the prefix cache",
            },
        )
        self._drafts = _Counters(
            model,
            version,
            {
                GeneratorMetrics.DRAFT_TOKENS: "Draft tokens checked by speculative decoding (prompt lookup)",
                GeneratorMetrics.ACCEPTED_DRAFT_TOKENS: "Draft tokens that speculative decoding took",
            },
        )
        self._loop = threading.Thread(
            target=self.engine.serve_forever, args=(self._stop, self._on_step), name="generator-loop"
        )
        self._loop.start()

    def _on_step(self, waiting: int, running: int) -> None:
        self._load.set(waiting, running)
        if self.engine.prefix_cache is not None:
            stats = self.engine.prefix_cache.stats
            self._prefix.update((stats.hits, stats.misses, stats.saved_tokens))
        self._drafts.update((self.engine.drafted_tokens, self.engine.accepted_tokens))

    def _prompt_ids(self, request: Any) -> list[int]:
        prompt, messages = (
            _optional_text(request, GeneratorTensors.PROMPT),
            _optional_text(request, GeneratorTensors.MESSAGES),
        )
        if (prompt is None) == (messages is None):
            raise InputError("give exactly one of PROMPT and MESSAGES")
        if messages is not None:
            if self.chat is None:
                raise InputError("this model has no chat template; send PROMPT instead of MESSAGES")
            try:
                parsed = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise InputError(f"MESSAGES is not valid JSON: {exc}") from exc
            if not isinstance(parsed, list):
                raise InputError('MESSAGES must be a JSON list of {"role", "content"} objects')
            prompt = self.chat.render(parsed)
        assert prompt is not None
        return list(self.tokenizer.encode(prompt, add_special_tokens=False).ids)

    @staticmethod
    def _params(request: Any) -> SamplingParams:
        text = _optional_text(request, GeneratorTensors.PARAMETERS)
        if text is None:
            return SamplingParams()
        try:
            return SamplingParams.parse(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"PARAMETERS is not valid JSON: {exc}") from exc

    def execute(self, requests: list[Any]) -> None:
        """Queue each request; a bad or refused one gets a final error response at once."""
        for request in requests:
            stream = _Stream(request)
            try:
                generation = GenerationRequest(
                    self._prompt_ids(request), self._params(request), stream.emit, stream.is_cancelled, stream.fail
                )
                self.engine.submit(generation)
            except InputError as exc:
                stream.fail(INPUT_ERROR + str(exc), pb_utils.TritonError.INVALID_ARG)
            except BusyError as exc:
                stream.fail(BUSY_ERROR + str(exc), pb_utils.TritonError.UNAVAILABLE)
            except Exception as exc:  # a bug must still answer the request, or its client waits for ever
                log.exception("generator: a request could not be queued")
                stream.fail(f"the generator could not queue the request: {type(exc).__name__}: {exc}")

    def finalize(self) -> None:
        """Stop the loop; sequences still running end as cancelled."""
        self._stop.set()
        self.engine.wake()
        self._loop.join()

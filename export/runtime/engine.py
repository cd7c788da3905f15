"""Continuous batching: one loop steps every running sequence together, one token each per step.

A submitted sequence waits in a bounded queue until a slot and enough KV-cache room are free;
then its prompt is prefilled, from the end of the longest prefix a recent prompt shares with it (whose
keys and values ``PrefixCache`` kept), in chunks of ``prefill_chunk_tokens``: one chunk per step, each
followed by a decode step of the running sequences, so a long prompt never stalls the streams already
running. Once its whole prompt is in, it joins the batch. While one sequence runs alone, a step feeds it a draft
of up to ``speculative_tokens`` tokens after its last one (``prompt_lookup``) and takes as many as the sampler
confirms, the same tokens as one at a time. Sequences that finish (a stop token or string, ``max_tokens``)
or are cancelled leave the batch at once, and their cache rows are freed.

The engine is plain Python over a ``Decoder``: the Triton model runs ``serve_forever`` in a
thread; the export-time parity check and the tests drive it with ``run_until_idle``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from tokenizers import Tokenizer

from .contract import GROUP_QUERY_ATTENTION, ONE_ROW_ONNX_FILE, ONNX_FILE, TOKENIZER_FILE
from .decoding import CacheShape, Decoder, Floats, RunningBatch, SlotDecoder, StepDecoder
from .encoding import InputError, ModelMetadata
from .inference import execution_providers
from .prefix_cache import PrefixCache
from .prompt_lookup import draft_tokens
from .sampling import Sampler, SamplingParams
from .text_stream import TextStream

FinishReason = Literal["stop", "length", "cancelled"]
# (new text, finish reason or None, prompt tokens, completion tokens)
Emit = Callable[[str, FinishReason | None, int, int], None]

log = logging.getLogger(__name__)


class BusyError(RuntimeError):
    """The wait queue is full."""


@dataclass(frozen=True)
class EngineLimits:
    """Bounds of the engine: concurrent sequences, KV-cache slots (padding included), waiting requests."""

    context_window: int
    max_sequences: int = 8
    max_kv_tokens: int = 16384
    max_queue: int = 64
    truncate_prompt: bool = True  # cut an over-long prompt from the start, or reject it
    prefix_cache_bytes: int = 256 * 2**20  # KV caches of recent prompts kept for reuse; 0: none
    prefill_chunk_tokens: int = 256  # prompt tokens prefilled per step, between decode steps; 0: a whole prompt
    speculative_tokens: int = 8  # draft tokens checked per step of a sequence running alone; 0: none


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate, and where its output goes."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Emit
    is_cancelled: Callable[[], bool] = lambda: False
    fail: Callable[[str], None] = lambda message: None  # the request ends with this error instead
    # Filled in by the engine.
    max_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    text: TextStream | None = None
    prefilled: tuple[int, list[Floats]] | None = None  # while its prompt is prefilled: tokens in, their KV
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def reserved_tokens(self) -> int:
        """The longest this sequence can grow: prompt plus ``max_tokens``."""
        return len(self.prompt_ids) + self.max_tokens


class GenerationEngine:
    """The continuous-batching loop over one decoder. ``submit`` and ``cancel`` are thread-safe."""

    def __init__(
        self,
        decoder: StepDecoder,
        new_text_stream: Callable[[Sequence[str]], TextStream],
        stop_token_ids: Sequence[int],
        limits: EngineLimits,
    ) -> None:
        self.decoder = decoder
        self.limits = limits
        self._new_text = new_text_stream
        self._stop_ids = frozenset(stop_token_ids)
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[GenerationRequest] = []
        self._prefilling: GenerationRequest | None = None  # admitted, its prompt partly prefilled
        self._batch: RunningBatch | None = None
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes) if limits.prefix_cache_bytes else None
        self._wake = threading.Condition()
        self.steps = 0  # decode steps run, for tests and metrics
        self.max_batch_rows = 0  # the most sequences ever stepped together
        self._verifier = decoder if isinstance(decoder, SlotDecoder) and decoder.verifies else None
        self.drafted_tokens = 0  # draft tokens checked, and of them accepted (``speculative_tokens``)
        self.accepted_tokens = 0

    @classmethod
    def from_version_dir(
        cls,
        version_dir: Path,
        onnx_file: Path | None = None,
        threads: int = 0,
        gpu_device: int | None = None,
        **limits: Any,
    ) -> GenerationEngine:
        """The engine of an exported generator version: its graph, tokenizer, stop tokens and context window.

        ``onnx_file`` replaces the version's ``model.onnx`` (and then its one-row graph, if any, is not used).
        ``limits`` override ``EngineLimits`` fields; ``threads`` 0 lets ONNX Runtime choose.
        """
        metadata = ModelMetadata.read(version_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = execution_providers(gpu_device or 0, gpu_device is not None, version_dir / "trt_cache")

        def load(path: Path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), options, providers=providers)

        graph = onnx_file or version_dir / ONNX_FILE
        extra = metadata.extra
        shape = CacheShape(int(extra["num_layers"]), int(extra["num_kv_heads"]), int(extra["head_dim"]))
        tokenizer = Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))
        decoder: StepDecoder
        if extra.get("attention") == GROUP_QUERY_ATTENTION:
            one_row = graph == version_dir / ONNX_FILE and "one_row_graph" in extra
            if one_row:
                # Two sessions, two thread pools on the same cores: a pool that spins on after its run takes the
                # cores from the other's next run (a prefill after one-row steps: 13% slower). Each pool stops
                # spinning when its run ends; not spinning at all made one-row steps 15% slower.
                options.add_session_config_entry("session.force_spinning_stop", "1")
            decoder = SlotDecoder(load(graph), shape, load(version_dir / ONE_ROW_ONNX_FILE) if one_row else None)
        else:
            decoder = Decoder(load(graph), shape)
        return cls(
            decoder,
            lambda stop: TextStream(tokenizer, stop),
            [int(i) for i in extra["stop_token_ids"]],
            replace(EngineLimits(context_window=metadata.max_sequence_length), **limits),
        )

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; ``InputError`` if it can never fit, ``BusyError`` if the queue is full."""
        self._fit(request)
        request.sampler = Sampler(request.params)
        with self._wake:
            if len(self._waiting) >= self.limits.max_queue:
                raise BusyError(
                    f"{len(self._waiting)} requests are waiting already (max_queue {self.limits.max_queue})"
                )
            self._waiting.append(request)
            self._wake.notify()

    def _fit(self, request: GenerationRequest) -> None:
        """Set ``max_tokens`` and cut (or reject) a prompt that leaves no room in the context window."""
        window, prompt = self.limits.context_window, len(request.prompt_ids)
        wanted = request.params.max_tokens
        if prompt == 0:
            raise InputError("the prompt is empty")
        if wanted is not None and wanted >= window:
            raise InputError(f"max_tokens {wanted} leaves no room for a prompt in the context window of {window}")
        room = window - (wanted or 1)
        if prompt > room:
            if not self.limits.truncate_prompt:
                raise InputError(
                    f"the prompt has {prompt} tokens; with max_tokens {wanted or 1} it exceeds the context window "
                    f"of {window} tokens"
                )
            request.prompt_ids = request.prompt_ids[prompt - room :]
        request.max_tokens = wanted if wanted is not None else window - len(request.prompt_ids)
        if request.reserved_tokens > self.limits.max_kv_tokens:
            raise InputError(
                f"prompt plus max_tokens is {request.reserved_tokens} tokens, over the KV-cache budget "
                f"of {self.limits.max_kv_tokens}"
            )

    @property
    def idle(self) -> bool:
        with self._wake:
            return not self._waiting and not self._running and self._prefilling is None

    def run_until_idle(self) -> None:
        """Step until every submitted sequence has finished."""
        while not self.idle:
            self.step()

    def serve_forever(self, stop: threading.Event, on_step: Callable[[int, int], None] | None = None) -> None:
        """Step while there is work; sleep until ``submit`` (or ``stop``) wakes the loop. After each step,
        ``on_step(waiting, running)`` hears how many sequences wait and run (the model's metrics)."""
        while not stop.is_set():
            with self._wake:
                if not self._waiting and not self._running and self._prefilling is None:
                    self._wake.wait(timeout=0.5)
                    continue
            self.step()
            if on_step is not None:
                with self._wake:
                    waiting = len(self._waiting)
                on_step(waiting, len(self._running))
        prefilling = [self._prefilling] if self._prefilling is not None else []
        for request in [*self._running, *prefilling, *self._waiting]:
            self._finish(request, "cancelled")

    def wake(self) -> None:
        """Wake an idle loop (e.g. to see a stop event)."""
        with self._wake:
            self._wake.notify_all()

    def step(self) -> None:
        """One iteration: drop cancelled sequences, prefill one chunk of one admitted prompt, decode one token each.

        A failure (e.g. ONNX Runtime out of memory) ends the sequences it hit with an error, not the loop.
        """
        self._drop_cancelled()
        if self._prefilling is None:
            self._prefilling = self._admit()
            if self._prefilling is not None:
                self._start_prefill(self._prefilling)
        if self._prefilling is not None:
            request = self._prefilling
            try:
                self._prefill_chunk(request)
            except Exception as exc:
                self._prefilling = None
                self._fail([request], exc)
        if self._running and self._batch is not None:
            try:
                self._decode()
            except Exception as exc:
                failed, self._running, self._batch = self._running, [], None
                self._fail(failed, exc)

    @staticmethod
    def _fail(requests: Sequence[GenerationRequest], exc: Exception) -> None:
        log.exception("a generation step failed for %d sequence(s)", len(requests))
        for request in requests:
            request.fail(f"the generator failed: {type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        with self._wake:
            for request in [r for r in self._waiting if r.is_cancelled()]:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
        if self._prefilling is not None and self._prefilling.is_cancelled():
            self._finish(self._prefilling, "cancelled")
            self._prefilling = None
        cancelled = [i for i, r in enumerate(self._running) if r.is_cancelled()]
        for index in cancelled:
            self._finish(self._running[index], "cancelled")
        self._keep([i for i in range(len(self._running)) if i not in set(cancelled)])

    def _admit(self) -> GenerationRequest | None:
        """The next waiting request, if a slot and the KV budget allow it now (first come, first served)."""
        with self._wake:
            if not self._waiting or len(self._running) >= self.limits.max_sequences:
                return None
            request = self._waiting[0]
            longest = max([request.reserved_tokens, *(r.reserved_tokens for r in self._running)])
            if (len(self._running) + 1) * longest > self.limits.max_kv_tokens and self._running:
                return None
            return self._waiting.popleft()

    def _start_prefill(self, request: GenerationRequest) -> None:
        """Begin an admitted request's prompt after its longest cached prefix."""
        request.text = self._new_text(request.params.stop)
        request.prefilled = self.prefix_cache.lookup(request.prompt_ids) if self.prefix_cache is not None else None

    def _prefill_chunk(self, request: GenerationRequest) -> None:
        """Feed the prompt's next chunk; after the last, keep its cache for later prompts and join the batch."""
        prompt = request.prompt_ids
        start = request.prefilled[0] if request.prefilled is not None else 0
        end = (
            min(len(prompt), start + self.limits.prefill_chunk_tokens)
            if self.limits.prefill_chunk_tokens
            else len(prompt)
        )
        logits, cache = self.decoder.prefill(prompt[:end], request.prefilled)
        if end < len(prompt):
            request.prefilled = (end, cache.past)
            return
        self._prefilling, request.prefilled = None, None
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompt, cache.past)
        if self._advance(request, logits):
            return
        self._running.append(request)
        self._batch = self.decoder.join(self._batch, cache)

    def _decode(self) -> None:
        assert self._batch is not None
        rows = len(self._running)
        if rows > 1 or not self._speculate(self._running[0]):
            tokens = [r.generated[-1] for r in self._running]
            logits, self._batch = self.decoder.step(self._batch, tokens)
            finished = {i for i, r in enumerate(self._running) if self._advance(r, logits[i])}
            if finished:
                self._keep([i for i in range(rows) if i not in finished])
        self.steps += 1
        self.max_batch_rows = max(self.max_batch_rows, rows)

    def _speculate(self, request: GenerationRequest) -> bool:
        """One step of the only running sequence over a draft after its last token (``prompt_lookup``): its tokens
        for as long as the sampler chooses them, and the sampler's next; False where there is no draft."""
        room = min(self.limits.speculative_tokens, request.max_tokens - len(request.generated) - 1)
        if self._verifier is None or room <= 0:
            return False
        draft = draft_tokens([*request.prompt_ids, *request.generated], room)
        if not draft:
            return False
        assert self._batch is not None
        logits, batch = self._verifier.verify(self._batch, [request.generated[-1], *draft])
        self.drafted_tokens += len(draft)
        accepted = 0  # draft tokens the sampler chose: the logits after each are right
        while True:
            finished = self._advance(request, logits[accepted])
            if finished or accepted == len(draft) or request.generated[-1] != draft[accepted]:
                break
            accepted += 1
        self.accepted_tokens += accepted
        if finished:
            self._keep([])
        else:
            batch.rewind(0, len(draft) - accepted)  # the keys and values of the draft's tokens after the first miss
        return True

    def _keep(self, rows: list[int]) -> None:
        """Keep only these running sequences (and their cache rows)."""
        if len(rows) == len(self._running):
            return
        self._running = [self._running[i] for i in rows]
        self._batch = self._batch.select(rows) if self._running and self._batch is not None else None

    def _advance(self, request: GenerationRequest, logits: Floats) -> bool:
        """Choose the request's next token and stream its text; whether the request has finished."""
        assert request.sampler is not None and request.text is not None
        token = request.sampler.choose(logits, [*request.prompt_ids, *request.generated])
        request.generated.append(token)
        reason: FinishReason | None = None
        if token in self._stop_ids:
            reason = "stop"
            delta = ""
        else:
            delta = request.text.push(token)
            if request.text.stopped:
                reason = "stop"
            elif len(request.generated) >= request.max_tokens:
                reason = "length"
        if reason is None:
            if delta:
                self._emit(request, delta, None)
            return False
        self._finish(request, reason, delta)
        return True

    def _finish(self, request: GenerationRequest, reason: FinishReason, delta: str = "") -> None:
        rest = request.text.flush() if request.text is not None and reason != "cancelled" else ""
        self._emit(request, delta + rest, reason)

    @staticmethod
    def _emit(request: GenerationRequest, text: str, reason: FinishReason | None) -> None:
        request.emit(text, reason, len(request.prompt_ids), len(request.generated))

"""One ONNX decoder with a KV cache, stepped for a changing batch of sequences.

Two graphs, two decoders. ``SlotDecoder`` runs a ``GroupQueryAttention`` graph (onnxruntime-genai's
model builder): the running sequences' caches stay in one buffer per layer that each step writes in place.
``Decoder`` runs the graph exported from transformers' attention, described here, which copies the cache
into each step's output.

The exported graph takes ``input_ids``, ``attention_mask``, ``position_ids`` and, per layer,
``past_key_values.<i>.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]``; it returns the last
position's ``logits`` ``[batch, vocab]`` and ``present.<i>.key`` / ``.value`` (past + new tokens).

Running sequences share one ``KVBatch``: their caches are left-padded to a common length, and
the attention mask hides the padding. Positions are kept per sequence, so padding never shifts
them and a sequence gets the same logits in any batch as alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]

# A GroupQueryAttention graph may also return the logits of every fed position, ``[batch, sequence, vocab]``, when
# its boolean input ``ALL_POSITIONS`` (false by default) is true: what checking a draft of several tokens needs.
POSITION_LOGITS = "position_logits"
ALL_POSITIONS = "all_positions"


@dataclass(frozen=True)
class CacheShape:
    """The KV cache's per-layer geometry."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def empty(self, rows: int) -> list[Floats]:
        return [np.zeros((rows, self.num_kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names()]


@dataclass(frozen=True)
class KVBatch:
    """The caches of some sequences, left-padded to ``length``; row ``r`` is one sequence.

    ``mask[r, t]`` is 1 where position ``t`` holds a real token of row ``r``; ``positions[r]`` is the
    position id of that row's next token (its number of real tokens).
    """

    past: list[Floats]
    mask: Ints
    positions: Ints

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def padded_tokens(self) -> int:
        """Cache slots held, padding included: ``rows * length``."""
        return self.rows * self.length

    def extend(self, other: KVBatch) -> KVBatch:
        """This batch's rows and then ``other``'s, the shorter side left-padded to the longer."""
        if self.rows == 0:
            return other
        length = max(self.length, other.length)
        mine, theirs = _left_pad(self, length), _left_pad(other, length)
        return KVBatch(
            [np.concatenate(pair, axis=0) for pair in zip(mine.past, theirs.past, strict=True)],
            np.concatenate([mine.mask, theirs.mask]),
            np.concatenate([self.positions, other.positions]),
        )

    def select(self, rows: Sequence[int]) -> KVBatch:
        """Only ``rows``, in that order, without the leading columns that are padding in all of them."""
        index = np.asarray(rows, dtype=np.int64)
        mask = self.mask[index]
        real = np.flatnonzero(mask.any(axis=0))
        start = int(real[0]) if real.size else self.length
        return KVBatch(
            [np.ascontiguousarray(layer[index, :, start:]) for layer in self.past],
            np.ascontiguousarray(mask[:, start:]),
            self.positions[index],
        )


def _require_inputs(session: ort.InferenceSession, names: Sequence[str]) -> None:
    """``ValueError`` unless the decoder graph of ``session`` takes every input of ``names``."""
    missing = set(names) - {i.name for i in session.get_inputs()}
    if missing:
        raise ValueError(f"the decoder graph lacks the inputs {sorted(missing)}")


def _left_pad(batch: KVBatch, length: int) -> KVBatch:
    extra = length - batch.length
    if extra == 0:
        return batch
    past = [np.pad(layer, ((0, 0), (0, 0), (extra, 0), (0, 0))) for layer in batch.past]
    return KVBatch(past, np.pad(batch.mask, ((0, 0), (extra, 0))), batch.positions)


class Decoder:
    """The decoder graph under ONNX Runtime: prefill one prompt, or step a batch by one token per row."""

    def __init__(self, session: ort.InferenceSession, shape: CacheShape) -> None:
        self.session = session
        self.shape = shape
        self._past_names = shape.past_names()
        _require_inputs(session, ["input_ids", "attention_mask", "position_ids", *self._past_names])

    def prefill(
        self, prompt_ids: Sequence[int], prefix: tuple[int, list[Floats]] | None = None
    ) -> tuple[Floats, KVBatch]:
        """The next-token logits ``[vocab]`` after ``prompt_ids``, and a one-row cache holding them.

        ``prefix``: the keys and values of the prompt's first tokens, computed before (``PrefixCache.lookup``,
        or an earlier chunk of the same prompt); only the rest of the prompt is fed.
        """
        count = len(prompt_ids)
        start, past = prefix if prefix is not None else (0, self.shape.empty(1))
        mask = np.ones((1, count), dtype=np.int64)
        logits, present = self._run(
            np.asarray([prompt_ids[start:]], dtype=np.int64), mask, np.arange(start, count, dtype=np.int64)[None], past
        )
        return logits[0], KVBatch(present, mask, np.asarray([count], dtype=np.int64))

    def join(self, batch: RunningBatch | None, cache: KVBatch) -> KVBatch:
        """``batch``'s rows (none if None) and then the prefilled ``cache``'s."""
        assert batch is None or isinstance(batch, KVBatch)
        return cache if batch is None else batch.extend(cache)

    def step(self, batch: RunningBatch, tokens: Sequence[int]) -> tuple[Floats, KVBatch]:
        """Feed one token per row; the logits ``[rows, vocab]`` and the grown cache."""
        assert isinstance(batch, KVBatch)
        mask = np.concatenate([batch.mask, np.ones((batch.rows, 1), dtype=np.int64)], axis=1)
        logits, past = self._run(
            np.asarray(tokens, dtype=np.int64)[:, None], mask, batch.positions[:, None], batch.past
        )
        return logits, KVBatch(past, mask, batch.positions + 1)

    def _run(self, ids: Ints, mask: Ints, positions: Ints, past: list[Floats]) -> tuple[Floats, list[Floats]]:
        feed: dict[str, npt.NDArray[np.generic]] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self._past_names, past, strict=True))
        logits, *present = self.session.run(None, feed)
        return logits, present


class RunningBatch(Protocol):
    """The cache of the running sequences, one row each, as a decoder steps it."""

    @property
    def rows(self) -> int: ...

    def select(self, rows: Sequence[int]) -> RunningBatch:
        """Only ``rows``, in that order."""
        ...


class StepDecoder(Protocol):
    """What the engine runs: prefill one prompt, join its cache to the batch, step the batch by one token."""

    def prefill(
        self, prompt_ids: Sequence[int], prefix: tuple[int, list[Floats]] | None = None
    ) -> tuple[Floats, KVBatch]: ...

    def join(self, batch: RunningBatch | None, cache: KVBatch) -> RunningBatch: ...

    def step(self, batch: RunningBatch, tokens: Sequence[int]) -> tuple[Floats, RunningBatch]: ...


class SlotBatch:
    """The running sequences' caches in fixed rows of one buffer per layer ``[rows, kv_heads, tokens, head_dim]``.

    Row ``r`` holds its sequence's keys and values at positions ``0 .. lengths[r] - 1`` (right-padded, as
    ``GroupQueryAttention`` reads them); the graph writes each step's keys and values into the buffer in
    place. A joining sequence is copied into the next free row, a leaving one is overwritten by the rows after
    it, and the buffer grows (doubling, one copy) only when a row or a token no longer fits.
    """

    def __init__(self, shape: CacheShape) -> None:
        self.shape = shape
        self.buffers: list[Floats] = self._allocate(0, 0)
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _allocate(self, rows: int, tokens: int) -> list[Floats]:
        dims = (rows, self.shape.num_kv_heads, tokens, self.shape.head_dim)
        return [np.zeros(dims, dtype=np.float32) for _ in self.shape.past_names()]

    def reserve(self, rows: int, tokens: int) -> None:
        """Room for ``rows`` sequences of ``tokens`` each; a larger buffer keeps every row's cache."""
        have_rows, have_tokens = self.buffers[0].shape[0], self.buffers[0].shape[2]
        if rows <= have_rows and tokens <= have_tokens:
            return
        grown = self._allocate(
            have_rows if rows <= have_rows else max(rows, 2 * have_rows),
            have_tokens if tokens <= have_tokens else max(tokens, 2 * have_tokens),
        )
        used = max(self.lengths, default=0)
        for new, old in zip(grown, self.buffers, strict=True):
            new[: self.rows, :, :used] = old[: self.rows, :, :used]
        self.buffers = grown

    def append(self, cache: KVBatch) -> None:
        """Copy a one-row cache (a prefill's) into the next row."""
        length = cache.length
        self.reserve(self.rows + 1, length + 1)
        for buffer, layer in zip(self.buffers, cache.past, strict=True):
            buffer[self.rows, :, :length] = layer[0]
        self.lengths.append(length)

    def rewind(self, row: int, tokens: int) -> None:
        """Forget the last ``tokens`` keys and values of ``row`` (a draft's that was not taken); later steps write
        over them."""
        self.lengths[row] -= tokens

    def select(self, rows: Sequence[int]) -> SlotBatch:
        """Keep only ``rows``, in that order, moved to the first rows of the buffer; the same batch. Rows before
        the first that moves stay where they are."""
        kept = [self.lengths[r] for r in rows]
        first = next((i for i, r in enumerate(rows) if r != i), len(rows))
        if first < len(rows):
            index = np.asarray(rows[first:], dtype=np.int64)
            used = max(kept[first:])
            for buffer in self.buffers:
                buffer[first : len(rows), :, :used] = buffer[index, :, :used]  # fancy indexing copies first
        self.lengths = kept
        return self


class SlotDecoder:
    """A ``GroupQueryAttention`` decoder graph (past and present may be one buffer) under ONNX Runtime.

    The graph takes ``input_ids``, ``attention_mask`` (``[batch, total]``, ones for each row's real tokens,
    its new ones included; positions follow from it) and per layer ``past_key_values.<i>.key`` / ``.value``;
    it returns the last position's ``logits`` ``[batch, 1, vocab]`` and ``present.<i>.key`` / ``.value``. A
    prompt is prefilled on its own (past and present apart, as for the copying graph); a decode step binds
    each layer's buffer of the running rows as both past and present, so no step copies the cache.
    ``one_row``, if given, is the same graph for decode steps of one row (its weights packed:
    ``tritonrag.export.packed_weights``).
    """

    def __init__(
        self, session: ort.InferenceSession, shape: CacheShape, one_row: ort.InferenceSession | None = None
    ) -> None:
        self.session = session
        self.one_row = one_row
        self.shape = shape
        self._past_names, self._present_names = shape.past_names(), shape.present_names()
        for graph in (session, one_row):
            if graph is not None:
                _require_inputs(graph, ["input_ids", "attention_mask", *self._past_names])

    def prefill(
        self, prompt_ids: Sequence[int], prefix: tuple[int, list[Floats]] | None = None
    ) -> tuple[Floats, KVBatch]:
        """The next-token logits ``[vocab]`` after ``prompt_ids``, and a one-row cache holding them (as
        `Decoder.prefill`; ``prefix``: the keys and values of the prompt's first tokens)."""
        count = len(prompt_ids)
        start, past = prefix if prefix is not None else (0, self.shape.empty(1))
        mask = np.ones((1, count), dtype=np.int64)
        feed: dict[str, npt.NDArray[np.generic]] = {
            "input_ids": np.asarray([prompt_ids[start:]], dtype=np.int64),
            "attention_mask": mask,
        }
        feed.update(zip(self._past_names, past, strict=True))
        logits, *present = self.session.run(["logits", *self._present_names], feed)
        return logits[0, -1], KVBatch(present, mask, np.asarray([count], dtype=np.int64))

    def join(self, batch: RunningBatch | None, cache: KVBatch) -> SlotBatch:
        """``batch`` (a new one if None) with the prefilled ``cache`` in its next row."""
        slots = batch if isinstance(batch, SlotBatch) else SlotBatch(self.shape)
        slots.append(cache)
        return slots

    @property
    def verifies(self) -> bool:
        """Whether the graph returns the logits of every fed position on request (``verify``)."""
        return POSITION_LOGITS in {o.name for o in self.session.get_outputs()}

    def step(self, batch: RunningBatch, tokens: Sequence[int]) -> tuple[Floats, SlotBatch]:
        """Feed one token per row, written into the rows' buffers in place; the logits ``[rows, vocab]``."""
        assert isinstance(batch, SlotBatch)
        session = self.one_row if batch.rows == 1 and self.one_row is not None else self.session
        logits = self._run_in_place(session, batch, np.asarray(tokens, dtype=np.int64)[:, None], "logits")
        return logits[:, -1], batch  # the logits alone: the cache stays where it is

    def verify(self, batch: RunningBatch, tokens: Sequence[int]) -> tuple[Floats, SlotBatch]:
        """Feed ``tokens`` (a draft after its last token) to the one running row in one run of the float32 graph,
        their keys and values written in place; the logits after each ``[len(tokens), vocab]``. ``SlotBatch.rewind``
        forgets the tokens of a draft that was not taken."""
        assert isinstance(batch, SlotBatch) and batch.rows == 1
        logits = self._run_in_place(self.session, batch, np.asarray([tokens], dtype=np.int64), POSITION_LOGITS)
        return logits[0], batch

    def _run_in_place(self, session: ort.InferenceSession, batch: SlotBatch, ids: Ints, output: str) -> Floats:
        """Run ``ids`` ``[rows, tokens]`` after the rows' caches, each layer's buffer bound as both past and present;
        ``output``'s value (``POSITION_LOGITS``: asked for)."""
        rows, fed = ids.shape
        lengths = np.asarray(batch.lengths, dtype=np.int64)
        total = int(lengths.max()) + fed  # the longest row with its new tokens
        batch.reserve(rows, total)
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", (np.arange(total)[None, :] < lengths[:, None] + fed).astype(np.int64))
        if output == POSITION_LOGITS:
            # An initializer's default (``add_position_logits``): binding it as a NumPy array finds no such input.
            binding.bind_ortvalue_input(ALL_POSITIONS, ort.OrtValue.ortvalue_from_numpy(np.array(True)))
        binding.bind_output(output)
        for past, present, buffer in zip(self._past_names, self._present_names, batch.buffers, strict=True):
            shared = ort.OrtValue.ortvalue_from_numpy(buffer[:rows])
            binding.bind_ortvalue_input(past, shared)
            binding.bind_ortvalue_output(present, shared)
        session.run_with_iobinding(binding)
        batch.lengths = [n + fed for n in batch.lengths]
        logits: Floats = binding.get_outputs()[0].numpy()
        return logits

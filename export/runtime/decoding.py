"""One ONNX decoder with a KV cache, stepped for a changing batch of sequences.

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

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


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
        names = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask", "position_ids", *self._past_names} - names
        if missing:
            raise ValueError(f"the decoder graph lacks the inputs {sorted(missing)}")

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

    def step(self, batch: KVBatch, tokens: Sequence[int]) -> tuple[Floats, KVBatch]:
        """Feed one token per row; the logits ``[rows, vocab]`` and the grown cache."""
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

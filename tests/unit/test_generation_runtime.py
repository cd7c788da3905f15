"""The generator's building blocks: parameters, sampling, the KV batch (its text ones: test_generation_text.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tritonrag.export.runtime.decoding import CacheShape, KVBatch, SlotBatch
from tritonrag.export.runtime.encoding import InputError
from tritonrag.export.runtime.sampling import Sampler, SamplingParams


def test_parameters_parse_and_default() -> None:
    params = SamplingParams.parse({"max_tokens": 5, "temperature": 0.5, "stop": "END", "seed": 3, "top_k": 4})
    assert params == SamplingParams(max_tokens=5, temperature=0.5, top_k=4, seed=3, stop=("END",))
    assert SamplingParams.parse({"seed": None, "max_tokens": None}) == SamplingParams()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1}, "temperature must be in [0.0, 2.0]"),
        ({"top_p": 0}, "top_p must be in (0.0, 1.0]"),
        ({"max_tokens": 0}, "max_tokens must be an integer"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
        ({"stop": ["a"] * 9}, "at most 8 stop strings"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"beam_width": 2}, "unknown generation parameters: ['beam_width']"),
    ],
)
def test_bad_parameters_are_named(params: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        SamplingParams.parse(params)


def test_greedy_picks_the_largest_logit_and_penalises_repeats() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams()).choose(logits, []) == 1
    # 3.0 / 1.2 = 2.5 < 2.9: a seen token loses to the runner-up.
    assert Sampler(SamplingParams(repetition_penalty=1.2)).choose(logits, [1]) == 2


def test_seeded_sampling_repeats_and_top_k_one_is_greedy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=7)
    first, second = Sampler(params), Sampler(params)
    draws = [first.choose(logits, []) for _ in range(20)]
    assert draws == [second.choose(logits, []) for _ in range(20)]
    assert len(set(draws)) > 5  # it does sample
    top1 = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=1))
    assert {top1.choose(logits, []) for _ in range(10)} == {int(np.argmax(logits))}


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    assert {sampler.choose(logits, []) for _ in range(200)} == {0, 1}


def _batch(lengths: list[int], layers: int = 2) -> KVBatch:
    """One row per length, cache values = row number + 1, left-padded with zeros."""
    width = max(lengths)
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], dtype=np.int64)
    past = [np.zeros((len(lengths), 1, width, 2), dtype=np.float32) for _ in range(layers)]
    for row, n in enumerate(lengths):
        for layer in past:
            layer[row, :, width - n :, :] = row + 1
    return KVBatch(past, mask, np.array(lengths, dtype=np.int64))


def test_kv_batch_extend_left_pads_and_select_trims() -> None:
    merged = _batch([3, 1]).extend(_batch([5]))
    assert merged.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert merged.positions.tolist() == [3, 1, 5]
    assert merged.past[0][2, 0, :, 0].tolist() == [1, 1, 1, 1, 1]  # the new row's own values
    assert merged.past[0][0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    kept = merged.select([1, 0])
    assert kept.length == 3 and kept.padded_tokens == 6
    assert kept.mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert kept.past[1][0, 0, :, 0].tolist() == [0, 0, 2]


def _prefilled(length: int, value: float, layers: int = 2) -> KVBatch:
    """A one-row prefill cache of ``length`` tokens, every key and value ``value`` + its position / 100."""
    positions = value + np.arange(length, dtype=np.float32) / 100
    past = [np.broadcast_to(positions[None, None, :, None], (1, 1, length, 2)).copy() for _ in range(layers)]
    return KVBatch(past, np.ones((1, length), dtype=np.int64), np.array([length], dtype=np.int64))


def test_slot_batch_appends_compacts_and_grows_keeping_every_row() -> None:
    shape = CacheShape(num_layers=1, num_kv_heads=1, head_dim=2)
    slots = SlotBatch(shape)
    for length, value in ((3, 1.0), (5, 2.0), (2, 3.0)):
        slots.append(_prefilled(length, value))
    assert slots.rows == 3 and slots.lengths == [3, 5, 2]
    assert slots.buffers[0].shape[2] >= 6  # room for one more token after the longest row
    assert slots.buffers[1][1, 0, :5, 0].tolist() == pytest.approx([2.0, 2.01, 2.02, 2.03, 2.04])
    assert slots.select([0, 2]) is slots  # the same buffers: a leaving row costs no copy of the others' cache
    assert slots.lengths == [3, 2] and slots.buffers[0][1, 0, :2, 0].tolist() == pytest.approx([3.0, 3.01])
    before = slots.buffers[0]
    slots.reserve(2, before.shape[2] + 1)  # a token past the end: a larger buffer, the rows kept
    assert slots.buffers[0] is not before and slots.buffers[0].shape[2] >= 2 * before.shape[2]
    assert slots.buffers[0][0, 0, :3, 0].tolist() == pytest.approx([1.0, 1.01, 1.02])
    assert slots.buffers[1][1, 0, :2, 0].tolist() == pytest.approx([3.0, 3.01])
    slots.select([1, 0])  # a reorder swaps the rows, through a copy of what moves
    assert slots.lengths == [2, 3] and slots.buffers[0][0, 0, :2, 0].tolist() == pytest.approx([3.0, 3.01])
    assert slots.buffers[0][1, 0, :3, 0].tolist() == pytest.approx([1.0, 1.01, 1.02])

"""The prefix cache's index and bounds, over KV arrays of a made-up shape (no model)."""

from __future__ import annotations

import numpy as np

from tritonrag.export.runtime.prefix_cache import Floats, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4


def kv(tokens: list[int]) -> list[Floats]:
    """A fake one-row prefill cache whose values encode each position's token, so a slice can be checked."""
    row = np.asarray(tokens, dtype=np.float32)[None, None, :, None]
    return [np.broadcast_to(row + layer, (1, HEADS, len(tokens), DIM)).copy() for layer in range(LAYERS * 2)]


def test_the_longest_whole_block_prefix_is_found_and_the_last_token_is_always_fed() -> None:
    cache = PrefixCache(max_bytes=10**6, block_tokens=4)
    stored = list(range(10))  # blocks [0..3], [4..7]; the last two tokens make no whole block
    cache.store(stored, kv(stored))
    assert cache.lookup([0, 1, 2, 3, 4, 5, 6, 7, 99]) is not None
    length, past = cache.lookup([0, 1, 2, 3, 4, 5, 6, 7, 99]) or (0, [])
    assert length == 8 and past[0].shape == (1, HEADS, 8, DIM)
    np.testing.assert_array_equal(past[0][0, 0, :, 0], np.arange(8, dtype=np.float32))
    assert (cache.lookup([0, 1, 2, 3, 4, 5, 6, 7]) or (0, []))[0] == 4  # at most all tokens but the last
    assert (cache.lookup([0, 1, 2, 3, 9, 9, 9, 9, 9]) or (0, []))[0] == 4  # diverges in the second block
    assert cache.lookup([1, 2, 3, 4, 5]) is None  # the first block differs
    assert cache.lookup([0, 1, 2]) is None  # shorter than a block
    assert (cache.stats.hits, cache.stats.misses, cache.stats.saved_tokens) == (4, 2, 8 + 8 + 4 + 4)


def test_least_recently_used_prompts_leave_first_and_shared_blocks_survive_their_holders() -> None:
    one_prompt = sum(a.nbytes for a in kv([0] * 8))
    cache = PrefixCache(max_bytes=2 * one_prompt, block_tokens=4)
    a, b, c = [1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 3, 3, 3, 3], [7, 7, 7, 7, 7, 7, 7, 7]
    cache.store(a, kv(a))
    cache.store(b, kv(b))  # shares a's first block
    assert cache.lookup([*a, 0]) is not None  # a is now the most recently used
    cache.store(c, kv(c))  # evicts b
    assert len(cache) == 2 and cache.nbytes == 2 * one_prompt
    assert (cache.lookup([*b, 0]) or (0, []))[0] == 4  # b's own block is gone; the shared one is a's
    assert (cache.lookup([*a, 0]) or (0, []))[0] == 8
    assert (cache.lookup([*c, 0]) or (0, []))[0] == 8
    cache.store(a, kv(a))  # already there: nothing added
    assert len(cache) == 2


def test_a_prompt_larger_than_the_cache_is_not_kept() -> None:
    cache = PrefixCache(max_bytes=100, block_tokens=4)
    cache.store(list(range(64)), kv(list(range(64))))
    assert len(cache) == 0 and cache.nbytes == 0

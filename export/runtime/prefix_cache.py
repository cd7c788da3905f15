"""``PrefixCache``: the KV caches of recent prompts, reused by later prompts that start with the same tokens.

RAG prompts share long beginnings (the chat template, the system prompt, the instructions), and a
multi-turn chat resends its whole history: a prompt whose first blocks of tokens match a cached prompt's
is prefilled from the end of the match only, on top of that prompt's keys and values.

Prompts are cut into blocks of ``block_tokens``; each block boundary of a stored prompt is indexed by a
hash chained over the blocks before it (as vLLM's automatic prefix caching does), so a lookup walks the
new prompt's blocks and stops at the first one no stored prompt shares. The cache keeps whole prompts
(their whole blocks), least recently used first out, within ``max_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # whole blocks of a prompt
    past: list[Floats]  # per layer key / value, [1, kv_heads, len(tokens), head_dim]
    nbytes: int
    hashes: list[int] = field(default_factory=list)  # the block boundaries indexed for it


@dataclass
class PrefixStats:
    """Lookups that found a prefix, lookups that did not, and the prompt tokens not prefilled thanks to hits."""

    hits: int = 0
    misses: int = 0
    saved_tokens: int = 0


class PrefixCache:
    """Whole-block prompt prefixes and their KV cache, LRU within ``max_bytes``. Not thread-safe: the engine's
    loop is its only user."""

    def __init__(self, max_bytes: int, block_tokens: int = 16) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.stats = PrefixStats()
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # chained block hash -> the entries holding that prefix (entry id -> tokens covered), newest last
        self._holders: dict[int, dict[int, int]] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _chain(self, tokens: Sequence[int], limit: int) -> list[tuple[int, int]]:
        """``(hash, boundary)`` of every whole block of ``tokens`` up to ``limit`` tokens."""
        chained, size = 0, self.block_tokens
        out = []
        for end in range(size, limit + 1, size):
            chained = hash((chained, tuple(tokens[end - size : end])))
            out.append((chained, end))
        return out

    def lookup(self, prompt_ids: Sequence[int]) -> tuple[int, list[Floats]] | None:
        """The longest cached whole-block prefix of ``prompt_ids`` (at most all tokens but the last, which the
        prefill must feed to get the next token's logits): its length and its KV, one row; None on a miss."""
        found: tuple[int, int] | None = None
        for key, _ in self._chain(prompt_ids, len(prompt_ids) - 1):
            holders = self._holders.get(key)
            if not holders:
                break
            found = next(reversed(holders.items()))
        entry = self._entries.get(found[0]) if found is not None else None
        if found is None or entry is None or entry.tokens[: found[1]] != tuple(prompt_ids[: found[1]]):
            self.stats.misses += 1
            return None
        length = found[1]
        self._entries.move_to_end(found[0])
        self.stats.hits += 1
        self.stats.saved_tokens += length
        return length, [np.ascontiguousarray(layer[:, :, :length]) for layer in entry.past]

    def store(self, prompt_ids: Sequence[int], past: Sequence[Floats]) -> None:
        """Keep the KV of the whole blocks of ``prompt_ids`` (``past``: its one-row prefill cache), evicting the
        least recently used prompts past ``max_bytes``; a prompt too large for the cache alone is not kept."""
        chain = self._chain(prompt_ids, len(prompt_ids))
        if not chain:
            return
        length = chain[-1][1]
        holders = self._holders.get(chain[-1][0])
        if holders:  # every block is cached already
            self._entries.move_to_end(next(reversed(holders)))
            return
        kept = [np.ascontiguousarray(layer[:, :, :length]) for layer in past]
        nbytes = sum(layer.nbytes for layer in kept)
        if nbytes > self.max_bytes:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        entry = _Entry(tuple(prompt_ids[:length]), kept, nbytes, [key for key, _ in chain])
        self._entries[entry_id] = entry
        self.nbytes += nbytes
        for key, end in chain:
            self._holders.setdefault(key, {})[entry_id] = end
        while self.nbytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for key in entry.hashes:
            holders = self._holders[key]
            del holders[entry_id]
            if not holders:
                del self._holders[key]

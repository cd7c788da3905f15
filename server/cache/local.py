"""``LocalCache``: the in-process L1, one per tier: least recently used out first, entries expire after a TTL."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Entry:
    value: bytes
    size: int
    expires_at: float | None


class LocalCache:
    """Bytes by key, bounded by ``max_entries`` and ``max_bytes`` (keys and values); each entry expires after the
    ``ttl_s`` it was put with (None: never). ``on_change(entries, bytes)`` hears every change of the totals."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._on_change = on_change
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        """The live value of ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and self._clock() >= entry.expires_at:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        """Store ``value``, evicting the least recently used entries over the bounds; one larger than
        ``max_bytes`` alone is not stored."""
        size = len(key) + len(value)
        if key in self._entries:
            self._remove(key)
        if size > self.max_bytes:
            return
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        self._entries[key] = _Entry(value, size, expires_at)
        self._changed(1, size)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        removed = len(self._entries)
        self._changed(-removed, -self.bytes)
        self._entries.clear()
        return removed

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._changed(-1, -entry.size)

    def _changed(self, entries: int, size: int) -> None:
        self.bytes += size
        if self._on_change is not None:
            self._on_change(entries, size)

"""``TwoLevelCache``: an L1 per tier in the process, then the L2 in Redis when one is configured.

A lookup asks L1, then L2 for what L1 lacks (an L2 hit is copied into L1); a store writes both. A
Redis failure is counted and the request goes on with L1 alone. Every lookup is counted per level,
tier and outcome, for ``/metrics`` (process-wide) and ``GET /v1/cache/stats`` (this cache).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

from tritonrag.clients.wire.schema import CacheCounts, CacheFlushed, CacheStats

from ..config import CacheSettings, CacheTierSettings
from . import metrics
from .flight import Flights
from .keys import TIERS, Tier
from .local import LocalCache
from .remote import L2Error, RedisCache
from .scope import Level

CacheLevel = Literal["l1", "l2"]
Outcome = Literal["hit", "miss", "error"]


class TwoLevelCache:
    """The cache of every tier, and the computations in flight (``flights``) that misses share."""

    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self.flights = Flights()
        self._l1 = {tier: self._local(tier, clock) for tier in TIERS}
        self._l2 = (
            RedisCache(settings.redis_url.get_secret_value(), settings.redis_timeout_s, settings.redis_retry_s, clock)
            if settings.redis_url is not None
            else None
        )
        self._counts: Counter[tuple[CacheLevel, Tier, Outcome]] = Counter()
        self._coalesced: Counter[Tier] = Counter()

    def _local(self, tier: Tier, clock: Callable[[], float]) -> LocalCache:
        tier_settings = self.tier(tier)
        entries, size = metrics.ENTRIES.labels("l1", tier), metrics.BYTES.labels("l1", tier)

        def on_change(added: int, added_bytes: int) -> None:
            entries.inc(added)
            size.inc(added_bytes)

        return LocalCache(tier_settings.l1_max_entries, tier_settings.l1_max_bytes, clock, on_change)

    def tier(self, tier: Tier) -> CacheTierSettings:
        settings: CacheTierSettings = getattr(self.settings, tier)
        return settings

    def enabled(self, tier: Tier) -> bool:
        """Whether ``tier`` is cached at all."""
        return self.settings.enabled and self.tier(tier).enabled

    async def get(self, tier: Tier, key: str) -> tuple[bytes | None, Level]:
        """The value of ``key`` and the level that had it; ``(None, "miss")`` when neither has it."""
        return (await self.get_many(tier, [key])).get(key, (None, "miss"))

    async def get_many(self, tier: Tier, keys: Sequence[str]) -> dict[str, tuple[bytes, CacheLevel]]:
        """The value and level of each of ``keys`` found, from L1, then from L2 in one round trip."""
        l1 = self._l1[tier]
        found: dict[str, tuple[bytes, CacheLevel]] = {}
        for key in keys:
            value = l1.get(key)
            if value is not None:
                found[key] = (value, "l1")
        missing = [key for key in keys if key not in found]
        self._count("l1", tier, "hit", len(found))
        self._count("l1", tier, "miss", len(missing))
        if not missing or self._l2 is None:
            return found
        try:
            values = await self._l2.get_many(missing)
        except L2Error:
            self._count("l2", tier, "error", len(missing))
            return found
        ttl_s = self.tier(tier).ttl_s
        for key, value in zip(missing, values, strict=True):
            if value is not None:
                l1.put(key, value, ttl_s)
                found[key] = (value, "l2")
        hits = sum(value is not None for value in values)
        self._count("l2", tier, "hit", hits)
        self._count("l2", tier, "miss", len(missing) - hits)
        return found

    async def put_many(self, tier: Tier, entries: Sequence[tuple[str, bytes]]) -> None:
        """Store every ``(key, value)`` in L1 and L2, with the tier's TTL."""
        ttl_s = self.tier(tier).ttl_s
        for key, value in entries:
            self._l1[tier].put(key, value, ttl_s)
        if self._l2 is not None and entries:
            try:
                await self._l2.put_many(entries, ttl_s)
            except L2Error:
                self._count("l2", tier, "error", len(entries))

    def coalesced(self, tier: Tier) -> None:
        """A miss joined an identical computation in flight."""
        self._coalesced[tier] += 1
        metrics.COALESCED.labels(tier).inc()

    def _count(self, level: CacheLevel, tier: Tier, outcome: Outcome, n: int) -> None:
        if n:
            self._counts[level, tier, outcome] += n
            metrics.REQUESTS.labels(level, tier, outcome).inc(n)

    def stats(self) -> CacheStats:
        """Counts per level and tier since the start; L1's entries and bytes now."""

        def counts(level: CacheLevel, tier: Tier) -> CacheCounts:
            return CacheCounts(
                hits=self._counts[level, tier, "hit"],
                misses=self._counts[level, tier, "miss"],
                errors=self._counts[level, tier, "error"],
                entries=len(self._l1[tier]) if level == "l1" else None,
                bytes=self._l1[tier].bytes if level == "l1" else None,
            )

        levels: list[CacheLevel] = ["l1", "l2"] if self._l2 is not None else ["l1"]
        return CacheStats(
            enabled=self.settings.enabled,
            redis=self._l2 is not None,
            levels={level: {tier: counts(level, tier) for tier in TIERS} for level in levels},
            coalesced={tier: self._coalesced[tier] for tier in TIERS},
        )

    async def flush(self) -> CacheFlushed:
        """Empty this process's L1 and delete this stack's keys (``<key_prefix>:*``) from L2."""
        l1 = sum(cache.clear() for cache in self._l1.values())
        l2 = None
        if self._l2 is not None:
            with contextlib.suppress(L2Error):
                l2 = await self._l2.delete_prefix(f"{self.prefix}:")
        return CacheFlushed(l1=l1, l2=l2)

    async def close(self) -> None:
        """Close the connections to Redis."""
        if self._l2 is not None:
            await self._l2.close()

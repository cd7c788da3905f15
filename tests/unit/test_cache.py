"""The cache's parts without Triton or Redis: the L1's bounds, single flight, keys, and an unreachable L2.

The cache in front of the services (hits, invalidation by writes, sampling, single flight of answers,
chunk embeddings, HTTP) is tested in test_services.py; with a real Redis in tests/integration/test_cache_redis.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from tests.clock import FakeClock
from tritonrag.deploy.launcher import free_port
from tritonrag.server.cache.flight import Flights
from tritonrag.server.cache.keys import canonical, make_key
from tritonrag.server.cache.levels import TwoLevelCache
from tritonrag.server.cache.local import LocalCache
from tritonrag.server.config import CacheSettings


def test_the_l1_evicts_the_least_recently_used_entry_beyond_its_entries() -> None:
    cache = LocalCache(max_entries=2, max_bytes=1000, clock=FakeClock())
    cache.put("a", b"1", None)
    cache.put("b", b"2", None)
    assert cache.get("a") == b"1"  # now "b" is the least recently used
    cache.put("c", b"3", None)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (b"1", None, b"3", 2)


def test_the_l1_holds_at_most_its_bytes_of_keys_and_values() -> None:
    changes: list[tuple[int, int]] = []
    cache = LocalCache(max_entries=100, max_bytes=10, clock=FakeClock(), on_change=lambda *c: changes.append(c))
    cache.put("a", b"1234", None)  # 5 bytes
    cache.put("b", b"1234", None)  # 10
    cache.put("c", b"12", None)  # 13: "a" goes
    assert (cache.get("a"), cache.bytes, len(cache)) == (None, 8, 2)
    cache.put("d", b"12345678901", None)  # alone over the bound: not stored, and evicts nothing
    assert (cache.get("d"), cache.get("b"), cache.bytes) == (None, b"1234", 8)
    cache.put("b", b"1", None)  # a replacement counts its new size
    assert cache.bytes == 5
    assert cache.clear() == 2 and (cache.bytes, len(cache)) == (0, 0)
    assert tuple(map(sum, zip(*changes, strict=True))) == (0, 0)  # the gauges end where they started


def test_l1_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    cache = LocalCache(max_entries=10, max_bytes=1000, clock=clock)
    cache.put("short", b"1", 5.0)
    cache.put("forever", b"2", None)
    clock.now += 4.9
    assert cache.get("short") == b"1"
    clock.now += 0.1
    assert (cache.get("short"), cache.get("forever"), len(cache), cache.bytes) == (None, b"2", 1, len("forever") + 1)


def test_keys_are_canonical() -> None:
    assert canonical({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    key = make_key("p", "search", {"b": 1, "a": 2})
    assert key == make_key("p", "search", {"a": 2, "b": 1}) and key.startswith("p:search:") and len(key) == 73
    assert key != make_key("p", "answer", {"a": 2, "b": 1}) != make_key("q", "search", {"a": 2, "b": 1})


class Source:
    """A stream of ``n`` items that waits for ``go`` before each, and records how it ended."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.go = asyncio.Event()
        self.sent = 0
        self.closed = False
        self.stored: list[list[int]] = []

    async def items(self) -> AsyncGenerator[int]:
        try:
            for i in range(self.n):
                await self.go.wait()
                self.sent += 1
                yield i
        finally:
            self.closed = True

    async def store(self, items: list[int]) -> None:
        self.stored.append(list(items))


def test_a_flight_goes_on_for_the_others_when_its_first_subscriber_leaves() -> None:
    async def scenario() -> None:
        flights, source = Flights(), Source(3)
        flight = flights.start(["k"], source.items(), source.store)
        leader = flight.subscribe()
        source.go.set()
        assert await anext(leader) == 0
        follower = flights.join("k")
        assert follower is flight
        late = follower.subscribe()
        await leader.aclose()
        assert [i async for i in late] == [0, 1, 2]  # from the first item, though the leader left
        assert source.stored == [[0, 1, 2]] and flights.join("k") is None and source.closed

    asyncio.run(scenario())


def test_a_flight_is_closed_when_its_last_subscriber_leaves_and_shares_its_error() -> None:
    async def scenario() -> None:
        flights, source = Flights(), Source(3)
        flight = flights.start(["k"], source.items(), source.store)
        reader = flight.subscribe()
        waiting = asyncio.ensure_future(anext(reader))
        await asyncio.sleep(0.01)  # the pull waits for ``go``
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await reader.aclose()
        assert source.closed and source.sent == 0 and source.stored == [] and flights.join("k") is None

        async def failing() -> AsyncGenerator[int]:
            yield 1
            raise RuntimeError("generator failed")

        flight = flights.start(["k"], failing(), source.store)
        results = await asyncio.gather(flight.result(), flight.result(), return_exceptions=True)
        assert [str(r) for r in results] == ["generator failed"] * 2 and source.stored == []

    asyncio.run(scenario())


def test_an_unreachable_redis_is_counted_and_skipped_and_never_fails_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    port = free_port()
    settings = CacheSettings(redis_url=f"redis://:the-redis-password@127.0.0.1:{port}/0", redis_retry_s=5.0)
    assert "the-redis-password" not in repr(settings)

    async def scenario() -> None:
        cache = TwoLevelCache(settings, clock)
        await cache.put_many("search", [("k", b"v")])  # L1 keeps it; Redis fails: the breaker opens
        assert await cache.get("search", "k") == (b"v", "l1")
        assert await cache.get("search", "other") == (None, "miss")  # Redis is skipped
        clock.now += 5.0
        assert await cache.get("search", "other") == (None, "miss")  # one trial, which fails
        assert (await cache.flush()).model_dump() == {"l1": 1, "l2": None}
        stats = cache.stats().levels["l2"]["search"]
        assert (stats.hits, stats.misses, stats.errors) == (0, 0, 3)
        await cache.close()

    asyncio.run(scenario())
    assert f"Redis at 127.0.0.1:{port} failed" in caplog.text and "the-redis-password" not in caplog.text

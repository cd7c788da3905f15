"""The cache's L2 in a real Redis (``redis-server`` from deploy/install-system-deps.sh), shared by two services
over the same data, as two orchestrators are; and a Redis that goes away under load, then comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.serving import RedisServer
from tests.unit.test_services import DOCS, StandInPool, services_and_pool_with
from tritonrag.clients.wire.schema import CacheStats, CollectionCreate, QueryRequest, SearchRequest, UpsertRequest
from tritonrag.server.app import Services


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def two_services(tmp_path: Path, minilm_dir: Path, url: str, **cache: float) -> list[tuple[Services, StandInPool]]:
    """Two services over the same data and Redis, each with its own L1 and stand-in Triton."""
    settings = {"redis_url": url, **cache}
    return [services_and_pool_with(tmp_path, minilm_dir, cache=settings) for _ in range(2)]


def l2(stats: CacheStats, tier: str) -> tuple[int, int, int]:
    counts = stats.levels["l2"][tier]
    return counts.hits, counts.misses, counts.errors


def test_two_orchestrators_share_the_l2(tmp_path: Path, minilm_dir: Path, redis_server: RedisServer) -> None:
    (first, first_pool), (second, second_pool) = two_services(tmp_path, minilm_dir, redis_server.url)
    question = QueryRequest(collection="c", query="cats purr", top_k=2)
    search = SearchRequest(collection="c", query="green tea")

    async def scenario() -> None:
        await first.collections.create_collection(CollectionCreate(name="c"))
        await first.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        computed = await first.answers.query(question)
        replayed = await second.answers.query(question)  # from the first's L2 entry: no generation
        assert (replayed.answer, replayed.sources) == (computed.answer, computed.sources)
        assert len(first_pool.generations) == 1 and second_pool.generations == []
        assert replayed.timings_ms.keys() == {"cache", "total"}
        assert (await first.search.search(search)).hits == (await second.search.search(search)).hits
        assert l2(first.cache.stats(), "answer") == l2(first.cache.stats(), "search") == (0, 1, 0)
        assert l2(second.cache.stats(), "answer") == l2(second.cache.stats(), "search") == (1, 0, 0)
        before = len(second_pool.embedded)
        await second.collections.upsert_documents("c", UpsertRequest(documents=DOCS))  # the same texts
        assert second_pool.embedded[before:] == []  # every chunk's vector came from L2
        assert l2(second.cache.stats(), "chunk_embedding") == (len(DOCS), 0, 0)

        client = redis.Redis.from_url(redis_server.url)
        client.set("another-stack:key", b"kept")
        keys = len(client.keys("tritonrag:*"))
        assert (await second.cache.flush()).l2 == keys > 0
        assert client.keys("*") == [b"another-stack:key"]
        client.close()
        for services in (first, second):
            await services.close()

    asyncio.run(scenario())


def test_a_redis_that_goes_away_under_load_fails_no_request_and_is_used_again_once_back(
    tmp_path: Path, minilm_dir: Path, redis_server: RedisServer
) -> None:
    (services, _), (other, _) = two_services(
        tmp_path, minilm_dir, redis_server.url, redis_retry_s=0.2, redis_timeout_s=0.25
    )
    errors: list[BaseException] = []
    served = 0

    async def load(worker: int, stop: asyncio.Event) -> None:
        """Searches: a few repeated ones (L1 hits) and a new one each round (an L1 miss, so L2 is asked)."""
        nonlocal served
        round_ = 0
        while not stop.is_set():
            round_ += 1
            for query in ("cats purr", "green tea", f"dogs bark {worker} {round_}"):
                try:
                    await services.search.search(SearchRequest(collection="c", query=query, mode="sparse"))
                    served += 1
                except Exception as exc:
                    errors.append(exc)

    async def under_load(seconds: float) -> CacheStats:
        stop = asyncio.Event()
        workers = [asyncio.create_task(load(worker, stop)) for worker in range(4)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*workers)
        return services.cache.stats()

    async def scenario() -> None:
        await services.collections.create_collection(CollectionCreate(name="c"))
        await services.collections.upsert_documents("c", UpsertRequest(documents=DOCS))
        up = await under_load(0.5)
        await asyncio.to_thread(redis_server.stop)
        down = await under_load(1.0)
        await asyncio.to_thread(redis_server.start)  # the same port, empty
        back = await under_load(1.5)
        assert errors == [] and served > 0
        assert l2(up, "search")[2] == 0 and l2(down, "search")[2] > 0  # Redis errors were counted ...
        assert down.levels["l1"]["search"].hits > up.levels["l1"]["search"].hits  # ... and L1 went on
        assert l2(back, "search")[1] > l2(down, "search")[1]  # L2 answers again: its misses count again
        # What is computed now that Redis is back is stored there: the other services finds it.
        last = SearchRequest(collection="c", query="dogs bark after the restart", mode="sparse")
        await services.search.search(last)
        await other.search.search(last)
        assert l2(other.cache.stats(), "search")[0] == 1
        for each in (services, other):
            await each.close()

    asyncio.run(scenario())

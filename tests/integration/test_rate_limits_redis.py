"""Rate limits in a real Redis (``redis-server`` from deploy/install-system-deps.sh): two limiters, as two
orchestrator replicas, share each bucket; so do two ``tritonrag serve`` processes, over HTTP and gRPC; a Redis
that goes away fails open to each process's buckets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import pytest
import redis
from pydantic import SecretStr

from tests.serving import RedisServer, orchestrator_env, start_orchestrator, stop_orchestrator
from tests.unit.test_rate_limits import admitted
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2 as pb
from tritonrag.clients.wire.proto.tritonrag.v1 import tritonrag_pb2_grpc as pb_grpc
from tritonrag.deploy.launcher import TritonServer
from tritonrag.server.api.grpc_service import RETRY_AFTER_METADATA
from tritonrag.server.config import BucketSettings, RateLimitSettings
from tritonrag.server.security.ratelimit import RateLimiter, RouteClass

PASSWORD = "s3cret-redis-password"  # accepted by a Redis without one (its default user is "nopass")
KEY = "tritonrag-ratelimit:answer:key:a"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def settings(server: RedisServer, **overrides: object) -> RateLimitSettings:
    """One token of ``answer`` every 2 s, 3 at once, in ``server`` reached with a password."""
    url = SecretStr(f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/0")
    return RateLimitSettings(redis_url=url, answer=BucketSettings(per_s=0.5, burst=3), **overrides)


def fallbacks(limiter: RateLimiter) -> float:
    (family,) = [family for family in limiter.collect() if family.name == "tritonrag_rate_limit_fallbacks"]
    return family.samples[0].value


@pytest.mark.anyio
async def test_two_replicas_share_each_bucket_and_retry_after_is_when_a_token_is_there(
    redis_server: RedisServer,
) -> None:
    first, second = RateLimiter(settings(redis_server)), RateLimiter(settings(redis_server))
    outcomes = [await admitted(limiter, "key:a", RouteClass.answer) for limiter in (first, second, first, second)]
    assert outcomes == [True, True, True, 2]  # the burst of 3 over both
    assert await admitted(first, "key:a", RouteClass.answer) == 2
    assert await admitted(second, "key:b", RouteClass.answer) is True  # another credential's bucket
    assert await admitted(second, "key:a", RouteClass.search) is True  # another class's

    client = redis.Redis.from_url(redis_server.url)
    assert 0 < client.pttl(KEY) <= 6000  # gone once idle until full again: 3 tokens at 0.5 a second
    await asyncio.sleep(2)  # the Retry-After given
    assert await admitted(second, "key:a", RouteClass.answer) is True
    assert await admitted(first, "key:a", RouteClass.answer) == 2
    assert fallbacks(first) == fallbacks(second) == 0
    client.close()
    for limiter in (first, second):
        await limiter.close()


@pytest.mark.anyio
async def test_a_redis_that_stops_fails_open_to_each_process_and_is_shared_again_once_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    limiter = RateLimiter(settings(redis_server, redis_retry_s=0.2))
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(4)] == [True, True, True, 2]

    await asyncio.to_thread(redis_server.stop)
    # No error escapes: this process's bucket decides, full at first.
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(4)] == [True, True, True, 2]
    assert fallbacks(limiter) == 4
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        f"Redis at 127.0.0.1:{redis_server.port} failed (ConnectionError); rate limits are kept in each process "
        "until it answers again"
    ]

    await asyncio.to_thread(redis_server.start)  # the same port, empty: no bucket, no script loaded
    await asyncio.sleep(0.3)  # past redis_retry_s: the next take is a trial
    # Admitted by a new bucket in Redis, where this process's own is empty.
    assert await admitted(limiter, "key:a", RouteClass.answer) is True
    assert fallbacks(limiter) == 4
    client = redis.Redis.from_url(redis_server.url)
    assert client.exists(KEY) == 1
    client.close()
    await limiter.close()
    assert PASSWORD not in caplog.text


ADMIN_KEY = "trk_rate-limits-over-two-orchestrators-0123456789"


def test_a_burst_over_two_orchestrators_sharing_redis_is_refused_with_retry_after(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    limits = {
        "TRITONRAG_AUTH__ADMIN_KEY": ADMIN_KEY,
        "TRITONRAG_RATE_LIMITS__REDIS_URL": redis_server.url,
        "TRITONRAG_RATE_LIMITS__MANAGE__PER_S": "0.5",
        "TRITONRAG_RATE_LIMITS__MANAGE__BURST": "3",
    }
    first, second = replicas = [
        start_orchestrator(orchestrator_env(tiny_triton, tiny_repository, tmp_path / f"data-{n}", **limits))
        for n in range(2)
    ]
    try:

        def list_collections(url: str) -> httpx2.Response:
            return httpx2.get(f"{url}/v1/collections", headers={"Authorization": f"Bearer {ADMIN_KEY}"})

        assert [list_collections(r.http_url).status_code for r in (first, second, first)] == [200] * 3
        refused = list_collections(second.http_url)
        assert (refused.status_code, refused.headers.get("retry-after")) == (429, "2")
        assert "rate_limits.manage" in refused.json()["error"]["message"]

        time.sleep(2)  # the Retry-After given
        assert list_collections(second.http_url).status_code == 200
        with grpc.insecure_channel(first.grpc_url) as channel, pytest.raises(grpc.RpcError) as grpc_refused:
            pb_grpc.TritonRagStub(channel).ListCollections(
                pb.ListCollectionsRequest(), metadata=(("authorization", f"Bearer {ADMIN_KEY}"),)
            )
        error = grpc_refused.value
        assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (RETRY_AFTER_METADATA, "2") in tuple(error.trailing_metadata() or ())
    finally:
        for replica in replicas:
            stop_orchestrator(replica)

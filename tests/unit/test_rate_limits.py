"""Rate limits: token buckets per credential and route class, in process, on a fake clock."""

from __future__ import annotations

import pytest

from tests.clock import FakeClock
from tritonrag.server.config import BucketSettings, RateLimitSettings
from tritonrag.server.errors import ResourceExhaustedError
from tritonrag.server.security.ratelimit import LocalBuckets, RateLimiter, RouteClass

pytestmark = pytest.mark.anyio

# answer: one token every 2 s, 3 at once; search: 5 a second, 2 at once.
SETTINGS = RateLimitSettings(answer=BucketSettings(per_s=0.5, burst=3), search=BucketSettings(per_s=5, burst=2))


async def admitted(limiter: RateLimiter, subject: str, route_class: RouteClass) -> bool | int:
    """True when admitted, else the refusal's ``retry_after_s``."""
    try:
        await limiter.acquire(subject, route_class)
    except ResourceExhaustedError as refused:
        assert refused.retry_after_s is not None
        return refused.retry_after_s
    return True


async def test_a_burst_is_admitted_then_refused_with_the_whole_seconds_until_a_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(SETTINGS, clock)
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(4)] == [True, True, True, 2]
    with pytest.raises(ResourceExhaustedError) as refused:
        await limiter.acquire("key:a", RouteClass.answer)
    assert refused.value.message == (
        "rate limit of 0.5 requests/s (burst 3) for 'answer' exceeded (rate_limits.answer); retry after 2 s"
    )

    clock.now += 1.5  # three quarters of a token: 0.5 s to go
    assert await admitted(limiter, "key:a", RouteClass.answer) == 1
    clock.now += 0.5  # exactly the Retry-After first given: one token
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(2)] == [True, 2]

    clock.now += 60  # idle far longer than a refill: the bucket holds its burst, no more
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(4)] == [True, True, True, 2]


async def test_a_wait_under_a_second_is_a_retry_after_of_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(SETTINGS, clock)
    assert [await admitted(limiter, "key:a", RouteClass.search) for _ in range(3)] == [True, True, 1]
    clock.now += 0.2  # one token at 5 a second
    assert [await admitted(limiter, "key:a", RouteClass.search) for _ in range(2)] == [True, 1]


async def test_each_credential_and_each_class_has_its_own_bucket() -> None:
    limiter = RateLimiter(SETTINGS, FakeClock())
    for _ in range(3):
        await limiter.acquire("key:a", RouteClass.answer)
    assert await admitted(limiter, "key:a", RouteClass.answer) == 2
    assert await admitted(limiter, "key:b", RouteClass.answer) is True
    assert await admitted(limiter, "key:a", RouteClass.search) is True
    assert await admitted(limiter, "key:a", RouteClass.manage) is True  # its default: 20 a second, 50 at once


async def test_the_counts_are_prometheus_series_by_class() -> None:
    limiter = RateLimiter(SETTINGS, FakeClock())
    for _ in range(5):
        await admitted(limiter, "key:a", RouteClass.answer)
    await limiter.acquire("key:a", RouteClass.ingest)
    samples = [
        (sample.name.removeprefix("tritonrag_rate_limit_"), sample.labels.get("class", ""), sample.value)
        for family in limiter.collect()
        for sample in family.samples
    ]
    assert samples == [
        *[("admitted_requests_total", c.value, {"answer": 3, "ingest": 1}.get(c, 0)) for c in RouteClass],
        *[("refused_requests_total", c.value, {"answer": 2}.get(c, 0)) for c in RouteClass],
        ("fallbacks_total", "", 0),
    ]


async def test_disabled_limits_admit_everything() -> None:
    limiter = RateLimiter(SETTINGS.model_copy(update={"enabled": False}), FakeClock())
    assert [await admitted(limiter, "key:a", RouteClass.answer) for _ in range(10)] == [True] * 10


async def test_a_bucket_idle_until_full_again_is_dropped() -> None:
    clock = FakeClock()
    buckets = LocalBuckets(clock)
    slow, fast = BucketSettings(per_s=1, burst=4), BucketSettings(per_s=10, burst=1)
    assert await buckets.take("slow", slow) == 0.0
    assert await buckets.take("fast", fast) == 0.0
    assert await buckets.take("fast", fast) == 0.1
    clock.now += 0.5  # "fast" is full, but held behind "slow" (full in 0.5 s)
    assert await buckets.take("later", slow) == 0.0
    assert len(buckets) == 3
    clock.now += 0.5  # "slow" and "fast" full: dropped; "later" is not
    assert await buckets.take("last", fast) == 0.0
    assert len(buckets) == 2
    assert await buckets.take("slow", slow) == 0.0  # as a new bucket: 3 tokens left
    assert [await buckets.take("slow", slow) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]

"""Rate limits: a token bucket per credential and route class, in process or shared by replicas in Redis.

``RateLimiter.acquire`` takes a token from the caller's bucket, or raises ``ResourceExhaustedError`` with
the whole seconds until the bucket has one again (``Retry-After``). With ``rate_limits.redis_url`` the
buckets live in Redis, refilled and taken by one Lua script on Redis' own clock, so that every orchestrator
sharing it applies one limit together; without, they live in this process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client.core import CounterMetricFamily, Metric
from redis.exceptions import RedisError

from ..cache.remote import redis_client
from ..config import BucketSettings, RateLimitSettings
from ..errors import ResourceExhaustedError
from ..routing.resilience import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)

_US = 1_000_000


class RouteClass(StrEnum):
    """The kinds of work limited separately: each has a rate limit (``rate_limits.<class>``); all but
    ``manage`` an in-flight limit too (``limits.<class>``, in ``api.admission``)."""

    search = "search"
    answer = "answer"
    ingest = "ingest"
    manage = "manage"  # every other authenticated route: collections, documents, jobs, keys, the cache, models


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted
    full_at: float  # from then on it is as good as a new bucket


class LocalBuckets:
    """Token buckets by key in this process, each created full and refilled continuously.

    A bucket left idle until it is full again is dropped, as Redis expires its keys: only the buckets used
    within the longest refill time (``burst / per_s``) are held.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently taken from first

    def __len__(self) -> int:
        return len(self._buckets)

    async def take(self, key: str, bucket: BucketSettings) -> float:
        """Take a token from the bucket ``key``: 0.0, or else the seconds until it has one (microseconds, up)."""
        now = self._clock()
        self._drop_full(now)
        held = self._buckets.get(key)
        tokens = bucket.burst if held is None else min(bucket.burst, held.tokens + (now - held.at) * bucket.per_s)
        if tokens < 1:
            return math.ceil((1 - tokens) * _US / bucket.per_s) / _US
        tokens -= 1
        self._buckets[key] = _Bucket(tokens, now, now + (bucket.burst - tokens) / bucket.per_s)
        self._buckets.move_to_end(key)
        return 0.0

    def _drop_full(self, now: float) -> None:
        # Stops at the first bucket not yet full: one that is waits at most the longest refill time.
        while self._buckets and next(iter(self._buckets.values())).full_at <= now:
            self._buckets.popitem(last=False)


# KEYS[1]: the bucket, a hash of its tokens and when they were counted (microseconds of Redis' clock, which
# every replica shares). ARGV: tokens a second, burst. Returns 0 when a token was taken, else the
# microseconds until one will be. A refusal writes nothing; a bucket expires once it would be full again.
_TAKE = """
local per_s = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if held[1] and held[2] then
  tokens = math.min(burst, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * per_s / 1000000)
end
if tokens < 1 then
  return math.ceil((1 - tokens) * 1000000 / per_s)
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / per_s))
return 0
"""


class SharedBucketsError(Exception):
    """Redis failed, timed out, or is being skipped after a failure."""


class RedisBuckets:
    """The same buckets in Redis at ``url``, shared by every process that uses it.

    Each take is one EVALSHA of the script (loaded again by redis-py when Redis answers NOSCRIPT, e.g.
    after a restart). Any failure raises ``SharedBucketsError``; after one, Redis is skipped for
    ``retry_s``, then one call goes through as a trial.
    """

    def __init__(self, url: str, timeout_s: float, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._client, self.where = redis_client(url, timeout_s)
        self._script = self._client.register_script(_TAKE)
        self._timeout_s = timeout_s
        self._breaker = CircuitBreaker(1, retry_s, clock)

    async def take(self, key: str, bucket: BucketSettings) -> float:
        """As ``LocalBuckets.take``, on Redis' clock; ``SharedBucketsError`` when Redis cannot answer."""
        breaker = self._breaker
        if not breaker.available():
            raise SharedBucketsError(f"Redis at {self.where} is skipped after a failure")
        recovering = breaker.state() is BreakerState.half_open
        breaker.acquire()
        try:
            async with asyncio.timeout(self._timeout_s):
                wait_us = await self._script(keys=[key], args=[bucket.per_s, bucket.burst])
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            outages = breaker.openings
            breaker.record_failure()
            if breaker.openings > outages:  # once per outage
                log.warning(
                    "Redis at %s failed (%s); rate limits are kept in each process until it answers again",
                    self.where,
                    type(exc).__name__,
                )
            raise SharedBucketsError(type(exc).__name__) from exc
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        if recovering:
            log.info("Redis at %s answers again: rate limits are shared again", self.where)
        return int(wait_us) / _US

    async def close(self) -> None:
        await self._client.aclose()


class RateLimiter:
    """The rate limits of ``settings``: ``acquire`` before serving a request; a Prometheus collector of its
    decisions. Both front-ends share one (they run in one event loop)."""

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._enabled = settings.enabled
        self._prefix = settings.key_prefix
        self._buckets: dict[RouteClass, BucketSettings] = {
            route_class: getattr(settings, route_class.value) for route_class in RouteClass
        }
        self._local = LocalBuckets(clock)
        url = settings.redis_url
        self._shared = (
            None
            if url is None
            else RedisBuckets(url.get_secret_value(), settings.redis_timeout_s, settings.redis_retry_s, clock)
        )
        self._admitted = dict.fromkeys(RouteClass, 0)
        self._refused = dict.fromkeys(RouteClass, 0)
        self._fallbacks = 0

    async def acquire(self, subject: str, route_class: RouteClass) -> None:
        """Take a token of ``subject``'s ``route_class`` bucket; ``ResourceExhaustedError`` (with the whole
        seconds until one is there as ``retry_after_s``) when it has none."""
        if not self._enabled:
            return
        bucket = self._buckets[route_class]
        wait_s = await self._take(f"{self._prefix}:{route_class.value}:{subject}", bucket)
        if wait_s == 0:
            self._admitted[route_class] += 1
            return
        self._refused[route_class] += 1
        retry_after_s = math.ceil(wait_s)
        raise ResourceExhaustedError(
            f"rate limit of {bucket.per_s:g} requests/s (burst {bucket.burst}) for {route_class.value!r} exceeded "
            f"(rate_limits.{route_class.value}); retry after {retry_after_s} s",
            retry_after_s=retry_after_s,
        )

    async def _take(self, key: str, bucket: BucketSettings) -> float:
        if self._shared is not None:
            try:
                return await self._shared.take(key, bucket)
            except SharedBucketsError:
                # Fail open to this process's buckets: a rate limit guards against one client's excess, not
                # correctness, and refusing everything while Redis is away would turn its outage into ours.
                # Meanwhile each replica applies the limit alone (at most replicas x the rate), and the
                # in-flight limits still bound what each process takes on.
                self._fallbacks += 1
        return await self._local.take(key, bucket)

    async def close(self) -> None:
        """Close the Redis connections, if any."""
        if self._shared is not None:
            await self._shared.close()

    def collect(self) -> Iterable[Metric]:
        labels = ["class"]
        admitted = CounterMetricFamily(
            "tritonrag_rate_limit_admitted_requests",
            "Requests admitted by their rate limit, by route class",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "tritonrag_rate_limit_refused_requests",
            "Requests refused by their rate limit, by route class",
            labels=labels,
        )
        for route_class in RouteClass:
            admitted.add_metric([route_class.value], self._admitted[route_class])
            refused.add_metric([route_class.value], self._refused[route_class])
        fallbacks = CounterMetricFamily(
            "tritonrag_rate_limit_fallbacks",
            "Rate-limit decisions taken in process because Redis failed or was being skipped",
            value=self._fallbacks,
        )
        return [admitted, refused, fallbacks]

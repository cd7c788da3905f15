"""``RedisCache``: the L2, in Redis (redis-py asyncio), shared by every orchestrator configured with it.

A failing Redis never fails a request: each command has a deadline, and any error raises
``L2Error``, which the caller counts and goes on without L2. After an error a circuit breaker
skips Redis for ``retry_s``, then lets one command through as a trial; the connection pool reconnects
by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..routing.resilience import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_SCAN_COUNT = 1000


class L2Error(Exception):
    """Redis failed, timed out, or is being skipped after a failure."""


def redis_client(url: str, timeout_s: float) -> tuple[Redis, str]:
    """A client of the Redis at ``url`` whose every command (connecting included) takes at most ``timeout_s``,
    and the address that logs and errors name it by (the URL may hold a password)."""
    # No retries inside redis-py: a failure costs one deadline at most, and the callers' breakers decide when
    # to retry.
    client = Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    where = client.connection_pool.connection_kwargs
    return client, where.get("path") or f"{where.get('host', 'localhost')}:{where.get('port', 6379)}"


class RedisCache:
    """Bytes by key in Redis at ``url``; entries expire after the TTL they were put with (None: never)."""

    def __init__(self, url: str, timeout_s: float, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._client, self.where = redis_client(url, timeout_s)
        self._breaker = CircuitBreaker(1, retry_s, clock)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, None where there is none."""
        values = await self._call(partial(self._client.mget, list(keys)))
        return [value if isinstance(value, bytes) else None for value in values]

    async def put_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float | None) -> None:
        """Store every ``(key, value)``, in one round trip."""

        async def put() -> Any:
            pipeline = self._client.pipeline(transaction=False)
            for key, value in entries:
                pipeline.set(key, value, px=None if ttl_s is None else max(1, round(ttl_s * 1000)))
            return await pipeline.execute()

        await self._call(put)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix`` (SCAN, then UNLINK by batch); returns how many."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        cursor, deleted = 0, 0
        while True:
            cursor, keys = await self._call(partial(self._client.scan, cursor=cursor, match=pattern, count=_SCAN_COUNT))
            if keys:
                deleted += int(await self._call(partial(self._client.unlink, *keys)))
            if cursor == 0:
                return deleted

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """``command`` within the deadline, through the breaker; ``L2Error`` on any failure."""
        breaker = self._breaker
        if not breaker.available():
            raise L2Error(f"Redis at {self.where} is skipped after a failure")
        recovering = breaker.state() is BreakerState.half_open
        breaker.acquire()
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await command()
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            outages = breaker.openings
            breaker.record_failure()
            if breaker.openings > outages:  # this failure opened the breaker: once per outage
                log.warning("Redis at %s failed (%s: %s); the cache goes on with L1 only", self.where, _name(exc), exc)
            raise L2Error(f"{_name(exc)}: {exc}") from exc
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        if recovering:
            log.info("Redis at %s answers again: L2 is back", self.where)
        return result


def _name(exc: BaseException) -> str:
    return type(exc).__name__

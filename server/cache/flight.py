"""Single flight: identical misses in flight at once share one computation (per process: replicas each run their own).

A ``Flight`` is one run of a stream that any number of subscribers read, each from its first item.
The stream advances when a subscriber needs an item that no one has read yet, so the fastest
subscriber sets the pace; a subscriber that goes away does not disturb the others, and when the last
one goes away before the end, the stream is closed (a generation is cancelled). When the stream ends
normally, ``finish`` (storing the result) runs before any subscriber sees the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class Stream(Protocol[_T_co]):
    """What a subscriber reads: an async iterator to close when done (an async generator is one)."""

    def __aiter__(self) -> AsyncIterator[_T_co]: ...
    async def __anext__(self) -> _T_co: ...
    async def aclose(self) -> None: ...


class Flight(Generic[_T]):
    """One shared run of ``source``; ``on_end`` is called once, when it ends or is abandoned."""

    def __init__(
        self,
        source: AsyncGenerator[_T],
        finish: Callable[[list[_T]], Awaitable[None]],
        on_end: Callable[[], None],
    ) -> None:
        self.items: list[_T] = []
        self.ended = False
        self.error: Exception | None = None
        self._source = source
        self._finish = finish
        self._on_end = on_end
        self._pull: asyncio.Future[None] | None = None
        self._subscribers = 0

    def subscribe(self) -> Subscription[_T]:
        """A reader of every item of the run, from the first; it counts until it is closed."""
        self._subscribers += 1
        return Subscription(self)

    async def result(self) -> _T:
        """The last item, once the run has ended (and its result is stored)."""
        async with contextlib.aclosing(self.subscribe()) as subscription:
            items = [item async for item in subscription]
        return items[-1]

    async def pull(self) -> None:
        """Wait for one more item or the end, reading it unless another subscriber already is; a subscriber's
        cancellation leaves the read to the others."""
        if self._pull is None:
            self._pull = asyncio.ensure_future(self._advance())
        await asyncio.shield(self._pull)

    async def leave(self) -> None:
        """A subscriber is done; when the last one leaves before the end, the source is closed."""
        self._subscribers -= 1
        if self._subscribers == 0 and not self.ended:
            self._end()
            if self._pull is not None:
                self._pull.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pull
            await self._source.aclose()

    async def _advance(self) -> None:
        """Read one more item; at the end, ``finish`` the run (shielded: it completes even if abandoned)."""
        try:
            self.items.append(await anext(self._source))
        except StopAsyncIteration:
            try:
                await asyncio.shield(self._finish(self.items))
            except Exception:  # the result stands; only storing it failed
                log.exception("storing a cached result failed")
            self._end()
        except Exception as exc:
            self.error = exc
            self._end()
        finally:
            self._pull = None

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._on_end()


class Subscription(Generic[_T]):
    """One subscriber's reading of a flight: every item from the first, then the run's error if it failed."""

    def __init__(self, flight: Flight[_T]) -> None:
        self._flight = flight
        self._sent = 0
        self._closed = False

    def __aiter__(self) -> Subscription[_T]:
        return self

    async def __anext__(self) -> _T:
        flight = self._flight
        while self._sent == len(flight.items):
            if flight.ended or self._closed:
                if flight.error is not None and not self._closed:
                    raise flight.error
                raise StopAsyncIteration
            await flight.pull()
        self._sent += 1
        return flight.items[self._sent - 1]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._flight.leave()


class Flights:
    """The runs in flight, by key: a miss joins the run of its key, if there is one, or starts one."""

    def __init__(self) -> None:
        self._running: dict[str, Flight[Any]] = {}

    def join(self, key: str) -> Flight[Any] | None:
        """The run in flight for ``key``, if any."""
        return self._running.get(key)

    def start(
        self, keys: Sequence[str], source: AsyncGenerator[_T], finish: Callable[[list[_T]], Awaitable[None]]
    ) -> Flight[_T]:
        """A new run of ``source``, which misses of any of ``keys`` join until it ends (none: a private run)."""

        def on_end() -> None:
            for key in keys:
                if self._running.get(key) is flight:
                    del self._running[key]

        flight = Flight(source, finish, on_end)
        self._running.update(dict.fromkeys(keys, flight))
        return flight

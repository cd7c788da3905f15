"""Server-Sent Events: the one writer of both HTTP APIs' streams, and its policy for failures and disconnects.

``event_stream`` turns a service's stream into an answer. Each API formats its own frames (``frame``
with or without an event name); the writer owns the rest, the same for both:

- The first item is fetched before the status line is sent: a failure up to it (the generator's
  queue is full, Triton is down) raises from ``event_stream`` and becomes an ordinary error answer
  (429, 503) that a client can retry. A later failure is sent as the API's error frame, and the
  stream ends.
- One task, the request's, drives the service's stream from its first item to its close. A client
  that goes away cancels that task once, as asyncio does (Starlette's streaming response would
  cancel an anyio scope instead, which cancels every await in it again and again); the service's
  stream is then closed shielded, so it can await its clean-up (cancelling the generation on Triton).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .common import aclose_shielded
from .errors import log_unexpected

_T = TypeVar("_T")

Frames = Callable[[AsyncIterator[_T]], AsyncGenerator[str]]  # a service's items as an API's frames
ErrorFrame = Callable[[Exception], str]  # a failure after the first item as an API's frame


def frame(data: str, event: str | None = None) -> str:
    """One event: ``data`` (compact JSON, one line), named ``event`` when given."""
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {data}\n\n"


async def event_stream(items: AsyncGenerator[_T], frames: Frames[_T], error_frame: ErrorFrame) -> EventStream:
    """``items``, a service's stream, as Server-Sent Events: ``frames(items)``, closed however the answer ends.

    Awaits the first item: a failure up to it raises here, with ``items`` closed.
    """
    started = await _Started.start(items)
    return EventStream(_ending_in_error(frames(started), error_frame), started)


class _Started(Generic[_T]):
    """A stream with its first item already fetched."""

    def __init__(self, items: AsyncGenerator[_T]) -> None:
        self._items = items
        self._first: list[_T] = []

    @classmethod
    async def start(cls, items: AsyncGenerator[_T]) -> _Started[_T]:
        started = cls(items)
        try:
            started._first.append(await anext(items))
        except StopAsyncIteration:
            pass
        except BaseException:
            await aclose_shielded(items)
            raise
        return started

    def __aiter__(self) -> _Started[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._first:
            return self._first.pop()
        return await anext(self._items)

    async def aclose(self) -> None:
        await aclose_shielded(self._items)


async def _ending_in_error(frames: AsyncGenerator[str], error_frame: ErrorFrame) -> AsyncGenerator[str]:
    """``frames``, or those up to a failure and then its ``error_frame``."""
    async with aclosing(frames):
        try:
            async for chunk in frames:
                yield chunk
        except Exception as exc:
            log_unexpected(exc, "an event stream")
            yield error_frame(exc)


class EventStream(StreamingResponse):
    """Server-Sent Events, sent from the request's own task (see the module's docstring); built by ``event_stream``."""

    def __init__(self, frames: AsyncGenerator[str], source: _Started[Any]) -> None:
        super().__init__(
            frames, media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )
        self._frames = frames
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        ended = gone = False

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nonlocal gone
            if not ended:
                gone = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self._frames:
                if gone:  # the service's stream swallowed the cancellation
                    break
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            ended = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
        finally:
            ended = True
            watcher.cancel()
            if gone:
                task.uncancel()
            await aclose_shielded(self._frames)
            await self._source.aclose()

"""Cached searches, answers and grounded chats: ``CachedSearch`` and ``CachedAnswers`` wrap the services.

Each request runs as a stream of items (a search: one response; an answer: its events; a chat: its
sources, then its deltas). A hit replays the stored result as such a stream, its timings replaced by
the lookup's (``{"cache": ms, "total": ms}``); a miss joins the identical request in flight, or starts
the computation, whose items are stored once it ends well: a degraded, cancelled or sampled result
(``temperature`` > 0 without a ``seed``) is never stored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from tritonrag.clients.wire.schema import (
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    FinishReason,
    GenerationDelta,
    Grounding,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchRequest,
    SearchResponse,
    Source,
    SourcesEvent,
)

from ..services.answers import AnswerService, gather_answer
from ..services.search import SearchService
from .flight import Stream
from .keys import Keys, Tier, deterministic
from .levels import TwoLevelCache
from .scope import current_scope

_T = TypeVar("_T")


async def cached_run(
    cache: TwoLevelCache,
    tier: Tier,
    key: str | None,
    use_cache: bool,
    compute: Callable[[], AsyncGenerator[_T]],
    record: Callable[[list[_T]], bytes | None],
    replay: Callable[[bytes, dict[str, float]], list[_T]],
) -> Stream[_T]:
    """The items of a request whose key is ``key`` (None: not cacheable, computed as it is).

    Unless the request bypasses the cache (``use_cache`` false, or ``Cache-Control: no-cache``): a hit is
    ``replay(value, timings)``, and a miss joins the identical computation in flight. Otherwise ``compute()``
    runs, and ``record(items)`` is stored when it ends (unless None).
    """
    if key is None:
        return compute()
    scope = current_scope()
    shared = use_cache and not scope.bypass
    if shared:
        started = time.perf_counter()
        value, level = await cache.get(tier, key)
        scope.report(level)
        if value is not None:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            return _items(replay(value, {"cache": elapsed_ms, "total": elapsed_ms}))
        flight = cache.flights.join(key)
        if flight is not None:
            cache.coalesced(tier)
            return flight.subscribe()

    async def store(items: list[_T]) -> None:
        value = record(items)
        if value is not None:
            await cache.put_many(tier, [(key, value)])

    return cache.flights.start([key] if shared else [], compute(), store).subscribe()


async def _items(items: Sequence[_T]) -> AsyncGenerator[_T]:
    for item in items:
        yield item


class CachedSearch:
    """``SearchService.search`` behind the ``search`` tier."""

    def __init__(self, search: SearchService, cache: TwoLevelCache, keys: Keys) -> None:
        self._search = search
        self._cache = cache
        self._keys = keys

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        """``SearchService.search`` of the collection at ``min_revision`` or later, from the cache on a hit."""
        await self._search.catch_up(request.collection, request.min_revision)
        key = await self._keys.search(request) if self._cache.enabled("search") else None

        async def compute() -> AsyncGenerator[SearchResponse]:
            yield await self._search.search(request, request_id)

        responses = await cached_run(
            self._cache, "search", key, request.use_cache, compute, _record_search, _replay_search
        )
        async with contextlib.aclosing(responses):
            [response] = [response async for response in responses]  # to the end: a miss is stored by then
        return response


class _StoredAnswer(BaseModel):
    """An answer as the ``answer`` tier stores it: its first and last events, and its text piece by piece
    (a hit streams as the answer did)."""

    sources: SourcesEvent
    pieces: list[str]
    done: DoneEvent


class _StoredChat(BaseModel):
    """A grounded chat as the ``chat`` tier stores it: its sources and its deltas."""

    sources: list[Source]
    deltas: list[GenerationDelta]


class CachedAnswers:
    """``AnswerService`` with answers behind the ``answer`` tier and grounded chats behind the ``chat`` tier;
    completions and ungrounded chats are not cached."""

    def __init__(self, answers: AnswerService, cache: TwoLevelCache, keys: Keys) -> None:
        self._answers = answers
        self._cache = cache
        self._keys = keys

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """The events of ``query_stream`` gathered into one answer."""
        return await gather_answer(request.collection, self.query_stream(request, request_id))

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        """``AnswerService.query_stream`` of the collection at ``min_revision`` or later, replayed from the cache on
        a hit: sources, the same deltas, done."""
        await self._answers.catch_up(request.collection, request.min_revision)
        cacheable = self._cache.enabled("answer") and deterministic(request.sampling)
        key = await self._keys.answer(request) if cacheable else None
        events = await cached_run(
            self._cache,
            "answer",
            key,
            request.use_cache,
            lambda: self._answers.query_stream(request, request_id),
            _record_answer,
            _replay_answer,
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]:
        """``AnswerService.chat``; a grounded one at temperature 0 or with a seed replayed from the cache on a hit:
        its sources, then the same deltas."""
        if grounding is None or not (self._cache.enabled("chat") and deterministic(params)):
            return await self._answers.chat(messages, params, grounding, request_id)
        key = await self._keys.chat(messages, params, grounding)

        async def compute() -> AsyncGenerator[_ChatItem]:
            degraded: list[str] = []
            sources, deltas = await self._answers.chat(messages, params, grounding, request_id, degraded)
            yield _ChatSources(sources, bool(degraded))
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta

        items = await cached_run(self._cache, "chat", key, True, compute, _record_chat, _replay_chat)
        try:
            first = await anext(items)
        except BaseException:
            await items.aclose()
            raise
        assert isinstance(first, _ChatSources)  # a chat's first item
        return first.sources, _deltas(items)

    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        """``AnswerService.complete``, uncached."""
        return self._answers.complete(prompt, params, request_id)


@dataclass(frozen=True)
class _ChatSources:
    """A chat's first item: its sources, and whether its retrieval was degraded (then it is not stored)."""

    sources: list[Source]
    degraded: bool = False


_ChatItem = _ChatSources | GenerationDelta


async def _deltas(items: Stream[_ChatItem]) -> AsyncGenerator[GenerationDelta]:
    """The rest of a chat's items: its deltas."""
    async with contextlib.aclosing(items):
        async for item in items:
            assert isinstance(item, GenerationDelta)  # only the first item is the sources
            yield item


def _record_search(responses: list[SearchResponse]) -> bytes | None:
    [response] = responses
    return None if response.degraded else response.model_dump_json().encode()


def _replay_search(value: bytes, timings: dict[str, float]) -> list[SearchResponse]:
    return [SearchResponse.model_validate_json(value).model_copy(update={"timings_ms": timings})]


def _record_answer(events: list[QueryEvent]) -> bytes | None:
    sources, done = events[0], events[-1]
    assert isinstance(sources, SourcesEvent) and isinstance(done, DoneEvent)  # an answer's first and last events
    if sources.degraded or done.degraded or done.finish_reason == FinishReason.cancelled:
        return None
    pieces = [event.text for event in events if isinstance(event, DeltaEvent)]
    return _StoredAnswer(sources=sources, pieces=pieces, done=done).model_dump_json().encode()


def _replay_answer(value: bytes, timings: dict[str, float]) -> list[QueryEvent]:
    stored = _StoredAnswer.model_validate_json(value)
    # The pieces were validated when the answer was stored; a hit's deltas skip validating each again.
    deltas = [DeltaEvent.model_construct(text=piece) for piece in stored.pieces]
    return [stored.sources, *deltas, stored.done.model_copy(update={"timings_ms": timings})]


def _record_chat(items: list[_ChatItem]) -> bytes | None:
    first, deltas = items[0], [item for item in items[1:] if isinstance(item, GenerationDelta)]
    assert isinstance(first, _ChatSources)  # a chat's first item
    last = deltas[-1] if deltas else None
    if first.degraded or last is None or last.finish_reason in (None, FinishReason.cancelled):
        return None
    return _StoredChat(sources=first.sources, deltas=deltas).model_dump_json().encode()


def _replay_chat(value: bytes, timings: dict[str, float]) -> list[_ChatItem]:
    stored = _StoredChat.model_validate_json(value)
    return [_ChatSources(stored.sources), *stored.deltas]

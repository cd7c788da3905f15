"""``AnswerService``: grounded answers (``/v1/query``) and the generator's streams for chats and completions.

An answer retrieves with the search service, packs the passages, best first, into the served
generator's context window, and streams the generator's text. The fallback chain: the generator,
then the fallback generator when one is configured, then an extractive answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from functools import partial

from tritonrag.clients.wire.schema import (
    MAX_QUERY_CHARS,
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    FinishReason,
    FlaggedPassage,
    GenerationDelta,
    Grounding,
    Injection,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchHit,
    SearchRequest,
    Source,
    SourcesEvent,
    Usage,
    clean_query,
)

from ..config import QuerySettings
from ..errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from ..generation.extractive import NO_PASSAGES_ANSWER, extractive_answer
from ..generation.packing import ContextWindow, Packed, pack
from ..generation.prompts import cited_numbers, grounded_chat, grounded_messages
from ..routing.triton_pool import TritonPool
from ..security.injection import InjectionGuard
from ..telemetry.timing import Timer
from .models import ModelService
from .search import SearchService


class AnswerService:
    """Answers to queries, and the generator's streams for chats and completions."""

    def __init__(self, search: SearchService, models: ModelService, pool: TritonPool, query: QuerySettings) -> None:
        self._search = search
        self._models = models
        self._pool = pool
        self._query = query
        self._guard = InjectionGuard(query.injection)

    async def catch_up(self, collection: str, min_revision: int | None) -> None:
        """`SearchService.catch_up`: the collection at ``min_revision`` or later before an answer retrieves."""
        await self._search.catch_up(collection, min_revision)

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """The events of ``query_stream`` gathered into one answer (``gather_answer``)."""
        return await gather_answer(request.collection, self.query_stream(request, request_id))

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        """Retrieve, pack the passages into the generator's window and answer: ``SourcesEvent``, then
        ``DeltaEvent``s as the text is generated, then ``DoneEvent`` (usage, timings, citations used).

        The first event waits for the generator's first token, so that a busy generator
        (``ResourceExhaustedError``) fails the request before anything is sent. No passage to give the
        generator (none found, or none fits): a fixed answer, without generating. Generator down (not
        served, or failing before its first token): the best passage's first sentences, cited, and
        ``degraded`` lists "generate"; a failure after the first token is raised. Closing the stream
        early closes the generation, and Triton cancels it. The prompt-injection heuristics check the query
        (refused in ``block`` mode) and the passages (``InjectionGuard``); ``SourcesEvent.injection`` reports them.
        """
        timer = Timer()
        query_flags = self._guard.check_query(request.query, "query")
        hits, flagged, degraded = await self._ground(request, request.query, timer, request_id)
        window = await self._models.served_window() if hits else None
        packed: Packed | None = None
        if window is not None:
            passages = [h.text for h in hits]
            build = partial(grounded_messages, request.query)
            max_tokens, default = request.sampling.max_tokens, self._query.default_max_tokens
            started = time.perf_counter()
            packed = await asyncio.to_thread(pack, window, build, passages, max_tokens, default)
            timer.stage("pack", started)
        kept = packed.kept if packed is not None else list(range(len(hits)))
        sources = [Source.of(hits[i], citation) for citation, i in enumerate(kept, start=1)]
        started = time.perf_counter()
        deltas = self._answer(sources, window, packed, request.sampling, request_id, degraded)
        text: list[str] = []
        usage, finish_reason = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), FinishReason.stop
        async with contextlib.aclosing(deltas):
            delta: GenerationDelta | None = await anext(deltas)
            yield SourcesEvent(
                sources=sources,
                dropped_passages=len(hits) - len(kept),
                degraded=list(degraded),
                injection=Injection(query=query_flags, dropped=flagged),
            )
            while delta is not None:
                if delta.text:
                    text.append(delta.text)
                    yield DeltaEvent(text=delta.text)
                if delta.finish_reason is not None:
                    finish_reason, usage = delta.finish_reason, _usage(delta)
                delta = await anext(deltas, None)
        if sources and packed is not None:
            timer.stage("generate", started)
        yield DoneEvent(
            usage=usage,
            finish_reason=finish_reason,
            timings_ms=timer.report(degraded),
            cited=cited_numbers("".join(text), len(sources)),
            degraded=degraded,
        )

    async def _answer(
        self,
        sources: Sequence[Source],
        window: ContextWindow | None,
        packed: Packed | None,
        params: SamplingParams,
        request_id: str | None,
        degraded: list[str],
    ) -> AsyncGenerator[GenerationDelta]:
        """The answer's deltas: from the generator, else from the fallback generator, else one delta with the
        fixed or the extractive answer (then "generate" is appended to ``degraded``)."""
        if not sources:
            yield GenerationDelta(text=NO_PASSAGES_ANSWER, finish_reason=FinishReason.stop)
            return
        names = self._models.names
        models = [names.generator, *([names.fallback_generator] if names.fallback_generator else [])]
        for model in models if window is not None and packed is not None else []:
            assert window is not None and packed is not None  # for the type checker: the loop runs only then
            async with contextlib.aclosing(self._generate(window, packed, params, request_id, model)) as stream:
                try:
                    first = await anext(stream)
                except (UnavailableError, DeadlineExceededError):
                    if "generate" not in degraded:
                        degraded.append("generate")
                    continue
                yield first
                async for delta in stream:
                    yield delta
                return
        if "generate" not in degraded:
            degraded.append("generate")
        yield GenerationDelta(text=extractive_answer(sources[0].text), finish_reason=FinishReason.stop)

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
        degraded_into: list[str] | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]:
        """The generator's stream over ``messages``; with ``grounding``, first a retrieval with the last user
        message, whose passages (those that fit, numbered from 1) go into the prompt and come back as sources.

        Grounded, ``max_tokens`` None is ``query.default_max_tokens`` capped by the window; the generator must
        be served (``UnavailableError``), as there is no answer to fall back to. ``degraded_into``, when given,
        receives the retrieval's degraded stages (the cache keeps no such chat). The last user message is the
        query: it is searched (cleaned, its start) and checked by the prompt-injection heuristics, as the
        passages are (a kept passage's rules are its source's ``flags``).
        """
        if grounding is None:
            return [], self._pool.generate(params, messages=messages, request_id=request_id)
        last = next((i for i in reversed(range(len(messages))) if messages[i].role == "user"), None)
        question = "" if last is None else clean_query(messages[last].content)[:MAX_QUERY_CHARS]
        if last is None or not question:
            raise InvalidArgumentError("a grounded chat needs a last user message with text", field="messages")
        self._guard.check_query(messages[last].content, f"messages.{last}.content")
        timer = Timer()
        hits, _, degraded = await self._ground(grounding, question, timer, request_id)
        window = await self._models.context_window()
        build = partial(grounded_chat, messages)
        passages, default = [h.text for h in hits], self._query.default_max_tokens
        started = time.perf_counter()
        packed = await asyncio.to_thread(pack, window, build, passages, params.max_tokens, default, "max_tokens")
        timer.stage("pack", started)
        timer.report(degraded)  # to the request's record: OpenAI's answer has no timings
        if degraded_into is not None:
            degraded_into.extend(degraded)
        sources = [Source.of(hits[i], citation) for citation, i in enumerate(packed.kept, start=1)]
        return sources, self._generate(window, packed, params, request_id)

    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        """The generator's stream for a raw ``prompt``; ``max_tokens`` None: as many as the window leaves."""
        return self._pool.generate(params, prompt=prompt, request_id=request_id)

    async def _ground(
        self, grounding: Grounding, query: str, timer: Timer, request_id: str | None
    ) -> tuple[list[SearchHit], list[FlaggedPassage], list[str]]:
        """The passages a grounded answer offers the generator, best first, those the prompt-injection heuristics
        left out, and the degraded retrieval stages."""
        # Built from validated parts (the grounding, the cleaned query), unvalidated: its collection is a key
        # ``<tenant>/<name>`` (security.tenancy), which the name pattern of requests refuses.
        request = SearchRequest.model_construct(
            collection=grounding.collection,
            query=query,
            top_k=grounding.top_k,
            mode=grounding.mode,
            fusion=grounding.fusion,
            filters=grounding.filters,
            rerank=grounding.rerank,
        )
        found = await self._search.find(request, timer, request_id)
        hits, flagged = self._guard.screen(found.hits(grounding.top_k))
        return hits, flagged, found.degraded

    def _generate(
        self,
        window: ContextWindow,
        packed: Packed,
        params: SamplingParams,
        request_id: str | None,
        model: str | None = None,
    ) -> AsyncGenerator[GenerationDelta]:
        """``model``'s (default: the generator's) stream for a packed prompt: chat messages, or the rendered text
        for a model without a chat template."""
        params = params.model_copy(update={"max_tokens": packed.max_tokens})
        if window.template is None:
            prompt = window.render(packed.messages)
            return self._pool.generate(params, prompt=prompt, request_id=request_id, model=model)
        return self._pool.generate(params, messages=packed.messages, request_id=request_id, model=model)


async def gather_answer(collection: str, events: AsyncGenerator[QueryEvent]) -> QueryResponse:
    """A streamed answer (``SourcesEvent``, ``DeltaEvent``s, ``DoneEvent``) as one response; ``Source.cited``
    marks the passages the answer cites. The stream is closed however this ends."""
    sources: SourcesEvent | None = None
    answer: list[str] = []
    done: DoneEvent | None = None
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, SourcesEvent):
                sources = event
            elif isinstance(event, DeltaEvent):
                answer.append(event.text)
            else:
                done = event
    if sources is None or done is None:
        raise ValueError("an answer stream must send its sources and its done event")
    cited = set(done.cited)
    return QueryResponse(
        collection=collection,
        answer="".join(answer),
        sources=[s.model_copy(update={"cited": s.citation in cited}) for s in sources.sources],
        dropped_passages=sources.dropped_passages,
        usage=done.usage,
        finish_reason=done.finish_reason,
        timings_ms=done.timings_ms,
        degraded=done.degraded,
        injection=sources.injection,
    )


def _usage(delta: GenerationDelta) -> Usage:
    """The token counts of a generation's last delta."""
    return Usage(
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
    )

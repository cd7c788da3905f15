"""In-memory fakes of the services the front-ends call (server/api/services.py), one per service, for tests."""

from __future__ import annotations

import asyncio
import json
import operator
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import httpx2
from fastapi import FastAPI

from tritonrag.clients.wire.schema import (
    And,
    ChatMessage,
    CollectionCreate,
    CollectionInfo,
    Condition,
    DeleteByFilterRequest,
    DeleteByFilterResponse,
    DeltaEvent,
    Document,
    DoneEvent,
    Embeddings,
    Filter,
    FinishReason,
    GenerationDelta,
    Grounding,
    GroupBy,
    JobInfo,
    JobStatus,
    Metadata,
    ModelVersion,
    QueryEvent,
    QueryRequest,
    QueryResponse,
    SamplingParams,
    SearchHit,
    SearchRequest,
    SearchResponse,
    Source,
    SourcesEvent,
    UpsertRequest,
    UpsertResult,
    Usage,
)
from tritonrag.deploy.launcher import free_port
from tritonrag.server.api.admission import Admission
from tritonrag.server.api.auth import Guard
from tritonrag.server.api.grpc_service import create_grpc_server
from tritonrag.server.api.http import create_http_app
from tritonrag.server.api.services import Answers, Collections, Search
from tritonrag.server.config import (
    ApiSettings,
    AuthSettings,
    LimitsSettings,
    ModelSettings,
    RateLimitSettings,
    TelemetrySettings,
)
from tritonrag.server.errors import AlreadyExistsError, NotFoundError, TritonRagError
from tritonrag.server.security.auth import Authenticator
from tritonrag.server.security.keys import KeyStore
from tritonrag.server.security.ratelimit import RateLimiter
from tritonrag.server.services.answers import gather_answer

NOW = 1_700_000_000.0
PROMPT_TOKENS = 12  # the prompt of every generation
VECTORS = [[0.5, -0.25, 0.125, 1.0], [0.0, 1.5, -2.0, 0.75]]  # the embeddings of texts, in turn; exact in float32
SERVED = [ModelVersion(name=name, version="1") for name in ("embedder", "reranker", "generator")]
Pace = Literal["finite", "busy", "idle"]

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def matches(filters: Filter, metadata: Metadata) -> bool:
    """Whether ``metadata`` passes ``filters``, every operator of the filter language."""
    if isinstance(filters, Condition):
        value, wanted = metadata.get(filters.field), filters.value
        if filters.op == "eq":
            return value == wanted
        if filters.op == "in":
            return isinstance(wanted, list) and value in wanted
        if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(wanted, int | float):
            return False
        return _COMPARISONS[filters.op](value, wanted)
    if isinstance(filters, And):
        return all(matches(part, metadata) for part in filters.and_)
    return any(matches(part, metadata) for part in filters.or_)


def answer_pieces(query: str, sources: int) -> list[str]:
    """The scripted answer to ``query``, one piece per token; it cites passage 1 when there is one."""
    return ["Answer", " to", f" {query}", " [1]" if sources else " (no sources)", "."]


def sse_events(response: httpx2.Response) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` of each Server-Sent Event of a native answer, parsed by hand."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for frame in response.text.split("\n\n"):
        if frame:
            lines = dict(line.split(": ", 1) for line in frame.split("\n"))
            assert set(lines) == {"event", "data"}
            events.append((lines["event"], json.loads(lines["data"])))
    return events


class FakeCollections:
    """Collections over dicts: one chunk per document; a batch over ``inline_max_documents`` becomes a job."""

    def __init__(self, inline_max_documents: int = 2) -> None:
        self.inline_max_documents = inline_max_documents
        self.collections: dict[str, CollectionCreate] = {}
        self.documents: dict[str, dict[str, Document]] = {}
        self.jobs: dict[str, JobInfo] = {}

    def stored(self, collection: str) -> dict[str, Document]:
        """The documents of ``collection``; NotFoundError when there is no such collection."""
        if collection not in self.documents:
            raise NotFoundError(f"collection {collection!r} does not exist")
        return self.documents[collection]

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        if request.name in self.collections:
            raise AlreadyExistsError(f"collection {request.name!r} exists", field="name")
        self.collections[request.name] = request
        self.documents[request.name] = {}
        return await self.get_collection(request.name)

    async def list_collections(self, prefix: str = "") -> list[CollectionInfo]:
        return [await self.get_collection(name) for name in self.collections if name.startswith(prefix)]

    async def get_collection(self, name: str) -> CollectionInfo:
        documents = self.stored(name)
        spec = self.collections[name]
        return CollectionInfo(
            name=name,
            chunking=spec.chunking,
            index_type=spec.index_type,
            language=spec.language,
            active_index="flat",
            documents=len(documents),
            chunks=len(documents),
            size_bytes=sum(len(doc.text) for doc in documents.values()),
            revision=len(documents),
            embedder=SERVED[0],
            created_at=NOW,
        )

    async def delete_collection(self, name: str) -> None:
        self.stored(name)
        del self.collections[name], self.documents[name]

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        documents = self.stored(collection)
        count = len(request.documents)
        if count > self.inline_max_documents:
            job_id = f"job-{len(self.jobs) + 1}"
            self.jobs[job_id] = JobInfo(
                id=job_id,
                collection=collection,
                status=JobStatus.queued,
                total=count,
                done=0,
                failed=0,
                errors=[],
                created_at=NOW,
                updated_at=NOW,
            )
            return UpsertResult(collection=collection, documents=count, chunks=0, job_id=job_id)
        for doc in request.documents:
            documents[doc.id] = Document(id=doc.id, text=doc.text, metadata=doc.metadata, chunks=1, updated_at=NOW)
        return UpsertResult(collection=collection, documents=count, chunks=count)

    async def get_document(self, collection: str, doc_id: str) -> Document:
        documents = self.stored(collection)
        if doc_id not in documents:
            raise NotFoundError(f"document {doc_id!r} does not exist in {collection!r}")
        return documents[doc_id]

    async def delete_document(self, collection: str, doc_id: str) -> None:
        await self.get_document(collection, doc_id)
        del self.documents[collection][doc_id]

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> DeleteByFilterResponse:
        documents = self.stored(collection)
        doomed = [doc_id for doc_id, doc in documents.items() if matches(request.filters, doc.metadata)]
        for doc_id in doomed:
            del documents[doc_id]
        return DeleteByFilterResponse(deleted=len(doomed))

    async def get_job(self, job_id: str) -> JobInfo:
        if job_id not in self.jobs:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return self.jobs[job_id]


class FakeSearch:
    """Search over ``FakeCollections``: the documents that pass the filters, in order, scored ``1 / (rank + 1)``."""

    def __init__(self, collections: FakeCollections) -> None:
        self._collections = collections
        self.searches: list[SearchRequest] = []
        self.request_ids: list[str | None] = []

    def hits(self, collection: str, filters: Filter | None, top_k: int) -> list[SearchHit]:
        """The hits of a search, without recording it."""
        documents = self._collections.stored(collection).values()
        hits = [
            SearchHit(
                doc_id=doc.id,
                chunk_id=rank,
                text=doc.text,
                start=0,
                end=len(doc.text),
                metadata=doc.metadata,
                score=1.0 / (rank + 1),
                scores={"dense": 0.5, "sparse": 2.0},
            )
            for rank, doc in enumerate(documents)
            if filters is None or matches(filters, doc.metadata)
        ]
        return hits[:top_k]

    async def search(self, request: SearchRequest, request_id: str | None = None) -> SearchResponse:
        self.searches.append(request)
        self.request_ids.append(request_id)
        hits = self.hits(request.collection, request.filters, request.top_k)
        if request.group_by is GroupBy.document:  # each document is one chunk here: name a second one
            hits = [hit.model_copy(update={"other_chunk_ids": [hit.chunk_id + 100]}) for hit in hits]
        return SearchResponse(collection=request.collection, hits=hits, timings_ms={"total": 1.5})


class ClosedStreams(list[bool]):
    """Per closed stream, in order, whether it had run to its end; ``wait`` and ``is_set`` tell any thread
    whether one has closed yet."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = threading.Event()

    def append(self, finished: bool) -> None:
        super().append(finished)
        self._closed.set()

    def is_set(self) -> bool:
        return self._closed.is_set()

    def wait(self, timeout: float) -> bool:
        return self._closed.wait(timeout)


class FakeAnswers:
    """Answers (``query``, ``query_stream``) and Chats (``chat``, ``complete``), grounded on ``FakeSearch``'s hits.

    Every generation answers ``reply`` (by default ``answer_pieces`` of the question and the number
    of sources), one delta per piece, cut at ``max_tokens``; the last delta has the finish reason
    (``length`` when cut, else ``finish_reason``) and the token counts (``PROMPT_TOKENS``, one per piece).
    Knobs, which ``reset`` restores:

    - ``call_error``: raised by ``chat`` itself (a grounded chat's missing collection, say).
    - ``start_error``: raised by a stream before its first item (e.g. ``ResourceExhaustedError``).
    - ``stream_error``: raised by a stream after its first delta.
    - ``stream``: after the first delta, ``busy`` yields deltas without end; ``idle`` sets
      ``stream_paused`` and waits until the stream is cancelled.
    - ``dropped_passages``, ``degraded``: reported by ``query_stream`` as they are.

    Every generation counts itself in ``streams_started``; when it is closed (its ``finally`` ran,
    also on cancellation or ``aclose``, after a clean-up that awaits) it appends to ``streams_closed``
    whether it had run to its end, and sets ``stream_closed`` (for the event loop's tasks).
    """

    def __init__(self, search: FakeSearch) -> None:
        self._search = search
        self.reset()

    def reset(self) -> None:
        """Forget the calls and the knobs of a previous test."""
        self.queries: list[QueryRequest] = []
        self.chats: list[tuple[list[ChatMessage], SamplingParams, Grounding | None]] = []
        self.completions: list[tuple[str, SamplingParams]] = []
        self.request_ids: list[str | None] = []  # of every query, chat and completion, in order
        self.reply: list[str] | None = None
        self.call_error: TritonRagError | None = None
        self.start_error: TritonRagError | None = None
        self.stream_error: Exception | None = None
        self.stream: Pace = "finite"
        self.finish_reason = FinishReason.stop
        self.dropped_passages = 0
        self.degraded: list[str] = []
        self.streams_started = 0
        self.streams_closed = ClosedStreams()
        self.stream_paused = asyncio.Event()
        self.stream_closed = asyncio.Event()

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """The events of ``query_stream`` gathered into one answer, as the real service does."""
        return await gather_answer(request.collection, self.query_stream(request, request_id))

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        """Sources (the search hits, numbered from 1), the scripted answer's deltas, done."""
        self.queries.append(request)
        self.request_ids.append(request_id)
        if self.start_error is not None:
            raise self.start_error
        sources = self._sources(request)
        yield SourcesEvent(sources=sources, dropped_passages=self.dropped_passages, degraded=list(self.degraded))
        completion: list[str] = []
        finish_reason = FinishReason.stop
        async with aclosing(self._deltas(self._reply(request.query, sources), request.sampling)) as deltas:
            async for delta in deltas:
                completion.append(delta.text)
                finish_reason = delta.finish_reason or finish_reason
                yield DeltaEvent(text=delta.text)
        yield DoneEvent(
            usage=Usage(
                prompt_tokens=PROMPT_TOKENS,
                completion_tokens=len(completion),
                total_tokens=PROMPT_TOKENS + len(completion),
            ),
            finish_reason=finish_reason,
            timings_ms={"search": 1.0, "generate": 2.0, "total": 3.0},
            cited=[1] if "[1]" in "".join(completion) else [],
            degraded=list(self.degraded),
        )

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        grounding: Grounding | None = None,
        request_id: str | None = None,
    ) -> tuple[list[Source], AsyncGenerator[GenerationDelta]]:
        """The sources of ``grounding`` (none without) and the scripted answer to the last message."""
        self.chats.append((list(messages), params, grounding))
        self.request_ids.append(request_id)
        if self.call_error is not None:
            raise self.call_error
        sources = self._sources(grounding) if grounding is not None else []
        question = messages[-1].content if messages else ""
        return sources, self._deltas(self._reply(question, sources), params)

    def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        """The scripted answer to ``prompt``, without sources."""
        self.completions.append((prompt, params))
        self.request_ids.append(request_id)
        return self._deltas(self._reply(prompt, []), params)

    def _reply(self, question: str, sources: list[Source]) -> list[str]:
        return answer_pieces(question, len(sources)) if self.reply is None else self.reply

    def _sources(self, grounding: Grounding) -> list[Source]:
        """The search hits of ``grounding``, numbered from 1 (not yet ``cited``: nothing is written yet)."""
        hits = self._search.hits(grounding.collection, grounding.filters, grounding.top_k)
        return [Source.of(hit, number) for number, hit in enumerate(hits, start=1)]

    async def _deltas(self, pieces: list[str], params: SamplingParams) -> AsyncGenerator[GenerationDelta]:
        """One delta per piece, as the class's docstring says; honours the knobs and records how it ended."""
        limit = len(pieces) if params.max_tokens is None else params.max_tokens
        emitted = pieces[:limit]
        finish_reason = FinishReason.length if limit < len(pieces) else self.finish_reason
        self.streams_started += 1
        finished = False
        try:
            if self.start_error is not None:
                raise self.start_error
            for count, text in enumerate(emitted, start=1):
                last = count == len(emitted)
                yield GenerationDelta(
                    text=text,
                    finish_reason=finish_reason if last else None,
                    prompt_tokens=PROMPT_TOKENS if last else 0,
                    completion_tokens=count if last else 0,
                )
                if count == 1:
                    if self.stream_error is not None:
                        raise self.stream_error
                    while self.stream == "busy":
                        await asyncio.sleep(0.005)
                        yield GenerationDelta(text=" and so on")
                    if self.stream == "idle":
                        self.stream_paused.set()
                        await asyncio.Event().wait()
            finished = True
        finally:
            await asyncio.sleep(0.01)  # clean-up that awaits, as a service's may: it must not be cut short
            self.streams_closed.append(finished)
            self.stream_closed.set()


class FakeModels:
    """The served models (``served``) and the embedder: the texts' vectors are ``VECTORS`` in turn, three
    tokens a text. ``call_error`` is raised by ``embed``; ``reset`` restores the knobs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the calls and the knobs of a previous test."""
        self.served = list(SERVED)
        self.embedded: list[list[str]] = []
        self.request_ids: list[str | None] = []
        self.call_error: TritonRagError | None = None

    async def served_models(self) -> list[ModelVersion]:
        return list(self.served)

    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings:
        self.embedded.append(list(texts))
        self.request_ids.append(request_id)
        if self.call_error is not None:
            raise self.call_error
        vectors = [VECTORS[i % len(VECTORS)] for i in range(len(texts))]
        return Embeddings(model=SERVED[0], vectors=vectors, prompt_tokens=3 * len(texts))


class FakeReadiness:
    """Readiness as ``ready`` says."""

    def __init__(self) -> None:
        self.ready = {"triton": True, "stores": True}

    async def readiness(self) -> dict[str, bool]:
        return dict(self.ready)


@dataclass(frozen=True)
class FakeServices:
    """One fake of each service, over the same collections; ``answers`` serves both answers and chats."""

    collections: FakeCollections
    search: FakeSearch
    answers: FakeAnswers
    models: FakeModels
    readiness: FakeReadiness

    @classmethod
    def create(cls, inline_max_documents: int = 2) -> FakeServices:
        collections = FakeCollections(inline_max_documents)
        search = FakeSearch(collections)
        return cls(collections, search, FakeAnswers(search), FakeModels(), FakeReadiness())

    def http_app(
        self,
        settings: ApiSettings,
        admission: Admission | None = None,
        telemetry: TelemetrySettings | None = None,
        guard: Guard | None = None,
        keys: KeyStore | None = None,
    ) -> FastAPI:
        """The HTTP API over the fakes, with the default model names, limits and telemetry unless given,
        ``open_guard()`` unless ``guard`` is given, and the key routes over ``keys`` when given."""
        return create_http_app(
            self.collections,
            self.search,
            self.answers,
            self.readiness,
            self.answers,
            self.models,
            settings,
            ModelSettings(),
            admission or Admission(LimitsSettings()),
            telemetry or TelemetrySettings(),
            guard or open_guard(),
            keys=keys,
        )


@asynccontextmanager
async def grpc_channel(
    collections: Collections,
    search: Search,
    answers: Answers,
    settings: ApiSettings | None = None,
    admission: Admission | None = None,
    telemetry: TelemetrySettings | None = None,
    guard: Guard | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the gRPC API over the services on a free port, with the default limits, telemetry and
    ``open_guard()`` unless given; the server stops after the block."""
    settings = settings or ApiSettings(grpc_port=free_port())
    server = create_grpc_server(
        collections,
        search,
        answers,
        settings,
        admission or Admission(LimitsSettings()),
        telemetry or TelemetrySettings(),
        guard or open_guard(),
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"{settings.host}:{settings.grpc_port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)


def open_guard() -> Guard:
    """Authentication off (every caller an admin of the tenant "default") and no rate limits: for tests of
    what lies behind them."""
    return Guard(Authenticator(AuthSettings(enabled=False), None), RateLimiter(RateLimitSettings(enabled=False)))

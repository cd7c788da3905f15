"""An in-memory stand-in for ``RagCore`` over dicts, for tests of the front-ends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import httpx2

from tritonrag.clients.wire.schema import (
    And,
    ChatMessage,
    CollectionCreate,
    CollectionInfo,
    Condition,
    DeleteByFilterRequest,
    DeltaEvent,
    Document,
    DoneEvent,
    Embeddings,
    Filter,
    FinishReason,
    GenerationDelta,
    Grounding,
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
from tritonrag.server.errors import AlreadyExistsError, NotFoundError, TritonRagError
from tritonrag.server.pipeline import gather_answer

NOW = 1_700_000_000.0
EMBEDDING_DIMENSION = 8
SERVED_MODELS = [
    ModelVersion(name="embedder", version="1"),
    ModelVersion(name="reranker", version="1"),
    ModelVersion(name="generator", version="1"),
]


def matches(filters: Filter, metadata: Metadata) -> bool:
    """``eq`` and ``in`` conditions under ``and``/``or``; enough for tests of the front-ends."""
    if isinstance(filters, Condition):
        value = metadata.get(filters.field)
        if filters.op == "eq":
            return value == filters.value
        return isinstance(filters.value, list) and value in filters.value
    if isinstance(filters, And):
        return all(matches(part, metadata) for part in filters.and_)
    return any(matches(part, metadata) for part in filters.or_)


def answer_pieces(query: str, sources: int) -> list[str]:
    """The scripted answer to ``query``, one piece per token; it cites passage 1 when there is one."""
    return ["Answer", " to", f" {query}", " [1]" if sources else " (no sources)", "."]


def fake_vector(text: str) -> list[float]:
    """A deterministic L2-normalised vector of ``EMBEDDING_DIMENSION`` floats from the text's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte - 127.5 for byte in digest[:EMBEDDING_DIMENSION]]
    norm = math.sqrt(sum(value * value for value in raw))
    return [value / norm for value in raw]


def sse_events(response: httpx2.Response) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` of each Server-Sent Event of an answer, parsed by hand."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for frame in response.text.split("\n\n"):
        if frame:
            lines = dict(line.split(": ", 1) for line in frame.split("\n"))
            assert set(lines) == {"event", "data"}
            events.append((lines["event"], json.loads(lines["data"])))
    return events


class FakeCore:
    """The core's methods over dicts: one chunk per document; a batch over ``inline_max_documents`` becomes a job.

    Generation is scripted: a query's answer is ``answer_pieces`` (one delta per piece, cut at
    ``max_tokens``), chat and completions answer the same way to the last message or the prompt.
    Knobs for tests:

    - ``generation_error``: raised by ``query``, ``query_stream``, ``chat`` and ``complete`` before
      any event (e.g. ``ResourceExhaustedError``).
    - ``mid_stream_error``: raised by a stream after its first delta.
    - ``pause_after_deltas``: a stream waits after that many deltas (``stream_paused`` is set)
      until ``resume`` is set, so a test can go away mid-stream.
    - ``dropped_passages``, ``degraded``: reported as they are.

    Every stream counts itself in ``streams_started``; when it is closed (its ``finally`` ran,
    also on cancellation or ``aclose``) it appends to ``streams_closed`` whether it had run to its
    end, and sets ``stream_closed``.
    """

    def __init__(self, inline_max_documents: int = 2) -> None:
        self.inline_max_documents = inline_max_documents
        self.collections: dict[str, CollectionCreate] = {}
        self.documents: dict[str, dict[str, Document]] = {}
        self.jobs: dict[str, JobInfo] = {}
        self.ready = {"triton": True, "stores": True}
        self.searches: list[SearchRequest] = []
        # generation
        self.queries: list[QueryRequest] = []
        self.chats: list[tuple[list[ChatMessage], SamplingParams, Grounding | None]] = []
        self.completions: list[tuple[str, SamplingParams]] = []
        self.embedded: list[list[str]] = []
        self.request_ids: list[str | None] = []  # of every query, chat, completion and embedding, in order
        self.generation_error: TritonRagError | None = None
        self.mid_stream_error: Exception | None = None
        self.pause_after_deltas: int | None = None
        self.dropped_passages = 0
        self.degraded: list[str] = []
        self.streams_started = 0
        self.streams_closed: list[bool] = []  # per closed stream: whether it had run to its end
        self.stream_paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.stream_closed = asyncio.Event()

    def _documents(self, collection: str) -> dict[str, Document]:
        if collection not in self.documents:
            raise NotFoundError(f"collection {collection!r} does not exist")
        return self.documents[collection]

    def _hits(self, collection: str, filters: Filter | None, top_k: int) -> list[SearchHit]:
        documents = self._documents(collection).values()
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

    def _sources(self, grounding: Grounding) -> list[Source]:
        """The fake search hits of ``grounding``, numbered from 1 (not yet ``cited``: nothing is written yet)."""
        hits = self._hits(grounding.collection, grounding.filters, grounding.top_k)
        return [
            Source(
                citation=number,
                doc_id=hit.doc_id,
                chunk_id=hit.chunk_id,
                text=hit.text,
                start=hit.start,
                end=hit.end,
                metadata=hit.metadata,
                score=hit.score,
            )
            for number, hit in enumerate(hits, start=1)
        ]

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        if request.name in self.collections:
            raise AlreadyExistsError(f"collection {request.name!r} exists", field="name")
        self.collections[request.name] = request
        self.documents[request.name] = {}
        return await self.get_collection(request.name)

    async def list_collections(self) -> list[CollectionInfo]:
        return [await self.get_collection(name) for name in self.collections]

    async def get_collection(self, name: str) -> CollectionInfo:
        documents = self._documents(name)
        spec = self.collections[name]
        return CollectionInfo(
            name=name,
            chunking=spec.chunking,
            index_type=spec.index_type,
            active_index="flat",
            documents=len(documents),
            chunks=len(documents),
            size_bytes=sum(len(doc.text) for doc in documents.values()),
            revision=len(documents),
            embedder=ModelVersion(name="embedder", version="1"),
            created_at=NOW,
        )

    async def delete_collection(self, name: str) -> None:
        self._documents(name)
        del self.collections[name], self.documents[name]

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        documents = self._documents(collection)
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
        documents = self._documents(collection)
        if doc_id not in documents:
            raise NotFoundError(f"document {doc_id!r} does not exist in {collection!r}")
        return documents[doc_id]

    async def delete_document(self, collection: str, doc_id: str) -> None:
        await self.get_document(collection, doc_id)
        del self.documents[collection][doc_id]

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> int:
        documents = self._documents(collection)
        doomed = [doc_id for doc_id, doc in documents.items() if matches(request.filters, doc.metadata)]
        for doc_id in doomed:
            del documents[doc_id]
        return len(doomed)

    async def search(self, request: SearchRequest) -> SearchResponse:
        self.searches.append(request)
        hits = self._hits(request.collection, request.filters, request.top_k)
        return SearchResponse(collection=request.collection, hits=hits, timings_ms={"total": 1.5})

    async def get_job(self, job_id: str) -> JobInfo:
        if job_id not in self.jobs:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return self.jobs[job_id]

    async def readiness(self) -> dict[str, bool]:
        return dict(self.ready)

    # Generation

    async def query(self, request: QueryRequest, request_id: str | None = None) -> QueryResponse:
        """The events of ``query_stream`` gathered into one answer, as the real core does."""
        return await gather_answer(request.collection, self.query_stream(request, request_id))

    async def query_stream(self, request: QueryRequest, request_id: str | None = None) -> AsyncGenerator[QueryEvent]:
        """Sources (the fake search hits, numbered from 1), the scripted answer's deltas, done."""
        self.queries.append(request)
        self.request_ids.append(request_id)
        if self.generation_error is not None:
            raise self.generation_error
        sources = self._sources(request)
        pieces = answer_pieces(request.query, len(sources))
        prompt_tokens = len(request.query.split()) + sum(len(source.text.split()) for source in sources)
        yield SourcesEvent(sources=sources, dropped_passages=self.dropped_passages, degraded=list(self.degraded))
        completion: list[str] = []
        finish_reason = FinishReason.stop
        async with aclosing(self._script(pieces, request.sampling)) as deltas:
            async for delta in deltas:
                completion.append(delta.text)
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
                yield DeltaEvent(text=delta.text)
        yield DoneEvent(
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(completion),
                total_tokens=prompt_tokens + len(completion),
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
        if self.generation_error is not None:
            raise self.generation_error
        sources = self._sources(grounding) if grounding is not None else []
        question = messages[-1].content if messages else ""
        return sources, self._script(answer_pieces(question, len(sources)), params, prompt_tokens=len(messages))

    async def complete(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[GenerationDelta]:
        """The scripted answer to ``prompt``, without sources."""
        self.completions.append((prompt, params))
        self.request_ids.append(request_id)
        if self.generation_error is not None:
            raise self.generation_error
        async with aclosing(self._script(answer_pieces(prompt, 0), params, len(prompt.split()))) as deltas:
            async for delta in deltas:
                yield delta

    async def _script(
        self, pieces: list[str], params: SamplingParams, prompt_tokens: int = 0
    ) -> AsyncGenerator[GenerationDelta]:
        """One delta per piece, cut at ``params.max_tokens``; the last has the finish reason and the counts.

        Honours ``pause_after_deltas`` and ``mid_stream_error``, and records how the stream ended.
        """
        limit = params.max_tokens if params.max_tokens is not None else len(pieces)
        emitted = pieces[:limit]
        finish_reason = FinishReason.length if limit < len(pieces) else FinishReason.stop
        self.streams_started += 1
        finished = False
        try:
            for count, text in enumerate(emitted, start=1):
                last = count == len(emitted)
                yield GenerationDelta(
                    text=text,
                    finish_reason=finish_reason if last else None,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=count,
                )
                if self.mid_stream_error is not None:
                    raise self.mid_stream_error
                if count == self.pause_after_deltas:
                    self.stream_paused.set()
                    await self.resume.wait()
            finished = True
        finally:
            self.streams_closed.append(finished)
            self.stream_closed.set()

    async def embed(self, texts: Sequence[str], request_id: str | None = None) -> Embeddings:
        """``fake_vector`` of each text; a token per word."""
        self.embedded.append(list(texts))
        self.request_ids.append(request_id)
        return Embeddings(
            model=SERVED_MODELS[0],
            vectors=[fake_vector(text) for text in texts],
            prompt_tokens=sum(len(text.split()) for text in texts),
        )

    async def served_models(self) -> list[ModelVersion]:
        return list(SERVED_MODELS)

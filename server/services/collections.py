"""``CollectionService``: collections, their documents, and the jobs that upsert large batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from tritonrag.clients.wire.schema import (
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    Document,
    DocumentIn,
    JobInfo,
    UpsertRequest,
    UpsertResult,
)

from ..config import IngestSettings
from ..errors import NotFoundError, PayloadTooLargeError, UnavailableError
from ..ingest.chunking import DocumentChunks
from ..ingest.jobs import JobRunner
from ..retrieval.collection import Collection, PreparedDocument
from ..retrieval.registry import CollectionRegistry
from ..retrieval.stages import Embedding
from ..store.documents import with_header
from .models import ModelService


class CollectionService:
    """Collection and document use cases. Documents are chunked with the served embedder's tokenizer and
    embedded by it, as bulk work that yields to searches.

    An upsert runs inline while it is small enough to finish within a request's deadline: at most
    ``ingest.inline_max_documents`` documents that chunk into at most ``ingest.inline_max_chunks``
    chunks; a larger one runs as a job. A document over ``ingest.max_document_bytes`` is refused (413).
    """

    def __init__(
        self,
        registry: CollectionRegistry,
        models: ModelService,
        embedding: Embedding,
        ingest: IngestSettings,
        jobs_dir: Path,
    ) -> None:
        self._registry = registry
        self._models = models
        self._embedding = embedding
        self._ingest = ingest
        self.jobs = JobRunner(registry.catalog, self._upsert_now, jobs_dir, ingest, self._embedder_ready)

    async def _embedder_ready(self) -> bool:
        try:
            await self._models.version(self._models.names.embedder)
        except UnavailableError:
            return False
        return True

    async def start(self) -> None:
        """Resume unfinished ingestion jobs."""
        await self.jobs.start()

    async def close(self) -> None:
        """Stop the jobs (they resume at the next start)."""
        await self.jobs.close()

    # Collections

    async def _info(self, collection: Collection) -> CollectionInfo:
        stats = await asyncio.to_thread(collection.info)
        created_at = await asyncio.to_thread(self._registry.catalog.collection_created_at, collection.name)
        try:
            embedder = await self._models.version(self._models.names.embedder)
        except UnavailableError:
            embedder = None
        return CollectionInfo(
            name=collection.name,
            chunking=collection.spec.chunking,
            index_type=collection.spec.index_type,
            language=collection.spec.language,
            active_index=stats.active_index,
            documents=stats.documents,
            chunks=stats.chunks,
            size_bytes=stats.size_bytes,
            revision=stats.revision,
            embedder=embedder,
            created_at=created_at,
        )

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        """Create an empty collection; AlreadyExistsError when the name is taken."""
        return await self._info(await self._registry.create(request))

    async def list_collections(self, prefix: str = "") -> list[CollectionInfo]:
        """The collections whose names start with ``prefix``."""
        names = [name for name in await self._registry.names() if name.startswith(prefix)]
        return [await self._info(await self._registry.get(name)) for name in names]

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self._info(await self._registry.get(name))

    async def delete_collection(self, name: str) -> None:
        """Delete a collection and its files; NotFoundError when it does not exist."""
        await self._registry.delete(name)

    # Documents

    async def _chunk(self, collection: Collection, documents: Sequence[DocumentIn]) -> list[DocumentChunks]:
        """Each document's header and chunks, cut in a worker thread (a long document takes a while)."""
        chunking = collection.spec.chunking
        chunker = await self._models.chunker(chunking)
        return await asyncio.to_thread(lambda: [chunker.chunk_document(doc, chunking.header) for doc in documents])

    async def _prepare(
        self, collection: Collection, documents: Sequence[DocumentIn], chunked: list[DocumentChunks] | None = None
    ) -> list[PreparedDocument]:
        chunked = chunked if chunked is not None else await self._chunk(collection, documents)
        texts = [with_header(header, span.text) for header, spans in chunked for span in spans]
        vectors = await self._embedding.run(texts, bulk=True)
        prepared, start = [], 0
        for doc, (header, spans) in zip(documents, chunked, strict=True):
            prepared.append(PreparedDocument(doc, spans, vectors[start : start + len(spans)], header))
            start += len(spans)
        return prepared

    async def _upsert_now(
        self, collection_name: str, documents: Sequence[DocumentIn], chunked: list[DocumentChunks] | None = None
    ) -> int:
        """Chunk (unless ``chunked`` is given), embed and store ``documents``; returns the chunks written."""
        collection = await self._registry.get(collection_name)
        prepared = await self._prepare(collection, documents, chunked)
        await asyncio.to_thread(collection.upsert, prepared)
        return sum(len(p.chunks) for p in prepared)

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        """Upsert inline, or as a job when the batch is too large to finish within a request."""
        self._check_sizes(request.documents)
        target = await self._registry.get(collection)
        documents = request.documents
        if len(documents) <= self._ingest.inline_max_documents:
            chunked = await self._chunk(target, documents)
            if sum(len(spans) for _, spans in chunked) <= self._ingest.inline_max_chunks:
                chunks = await self._upsert_now(collection, documents, chunked)
                return UpsertResult(collection=collection, documents=len(documents), chunks=chunks)
        job_id = await self.jobs.submit(collection, documents)
        return UpsertResult(collection=collection, documents=len(documents), chunks=0, job_id=job_id)

    def _check_sizes(self, documents: Sequence[DocumentIn]) -> None:
        """``PayloadTooLargeError`` naming the first document over ``ingest.max_document_bytes``."""
        limit = self._ingest.max_document_bytes
        for index, document in enumerate(documents):
            size = len(document.text.encode("utf-8"))
            if size > limit:
                raise PayloadTooLargeError(
                    f"document {document.id!r} has {size} bytes of text, over the limit of {limit} "
                    f"(ingest.max_document_bytes)",
                    field=f"documents.{index}.text",
                )

    async def get_document(self, collection: str, doc_id: str) -> Document:
        return await asyncio.to_thread((await self._registry.get(collection)).get, doc_id)

    async def delete_document(self, collection: str, doc_id: str) -> None:
        """Delete one document; NotFoundError when it does not exist."""
        removed = await asyncio.to_thread((await self._registry.get(collection)).delete, [doc_id])
        if removed == 0:
            raise NotFoundError(f"document {doc_id!r} not found in collection {collection!r}")

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> int:
        return await asyncio.to_thread((await self._registry.get(collection)).delete_by_filter, request.filters)

    async def get_job(self, job_id: str) -> JobInfo:
        return await self.jobs.get(job_id)

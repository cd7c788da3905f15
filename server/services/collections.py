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
from ..errors import NotFoundError, UnavailableError
from ..ingest.jobs import JobRunner
from ..retrieval.collection import Collection, PreparedDocument
from ..retrieval.registry import CollectionRegistry
from ..retrieval.stages import Embedding
from .models import ModelService


class CollectionService:
    """Collection and document use cases. Documents are chunked with the served embedder's tokenizer and
    embedded by it; an upsert of more than ``ingest.inline_max_documents`` runs as a job."""

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
        self._inline_max = ingest.inline_max_documents
        self.jobs = JobRunner(registry.catalog, self._upsert_now, jobs_dir, ingest)

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

    async def list_collections(self) -> list[CollectionInfo]:
        return [await self._info(await self._registry.get(name)) for name in await self._registry.names()]

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self._info(await self._registry.get(name))

    async def delete_collection(self, name: str) -> None:
        """Delete a collection and its files; NotFoundError when it does not exist."""
        await self._registry.delete(name)

    # Documents

    async def _prepare(self, collection: Collection, documents: Sequence[DocumentIn]) -> list[PreparedDocument]:
        chunker = await self._models.chunker(collection.spec.chunking)
        spans = [chunker.chunk(doc.text) for doc in documents]
        texts = [span.text for doc_spans in spans for span in doc_spans]
        vectors = await self._embedding.run(texts)
        prepared, start = [], 0
        for doc, doc_spans in zip(documents, spans, strict=True):
            prepared.append(PreparedDocument(doc, doc_spans, vectors[start : start + len(doc_spans)]))
            start += len(doc_spans)
        return prepared

    async def _upsert_now(self, collection_name: str, documents: Sequence[DocumentIn]) -> int:
        """Chunk, embed and store ``documents``; returns the number of chunks written."""
        collection = await self._registry.get(collection_name)
        prepared = await self._prepare(collection, documents)
        await asyncio.to_thread(collection.upsert, prepared)
        return sum(len(p.chunks) for p in prepared)

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        """Upsert inline, or as a job when the batch is large."""
        await self._registry.get(collection)
        if len(request.documents) > self._inline_max:
            job_id = await self.jobs.submit(collection, request.documents)
            return UpsertResult(collection=collection, documents=len(request.documents), chunks=0, job_id=job_id)
        chunks = await self._upsert_now(collection, request.documents)
        return UpsertResult(collection=collection, documents=len(request.documents), chunks=chunks)

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

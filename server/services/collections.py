"""``CollectionService``: collections, their documents, the jobs that upsert large batches, and the blue/green
re-index of collections to another embedder version."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from tritonrag.clients.wire.schema import (
    CollectionCreate,
    CollectionInfo,
    DeleteByFilterRequest,
    DeleteByFilterResponse,
    Document,
    DocumentIn,
    JobInfo,
    ModelVersion,
    Reindex,
    UpsertRequest,
    UpsertResult,
)

from ..config import IngestSettings
from ..errors import InvalidArgumentError, NotFoundError, PayloadTooLargeError, UnavailableError
from ..ingest.chunking import DocumentChunks
from ..ingest.jobs import Dispatch, JobRunner, ReindexStep
from ..retrieval.collection import Collection, EmbedderChangedError, PreparedDocument
from ..retrieval.registry import CollectionRegistry
from ..retrieval.stages import Embedding
from ..store.documents import with_header
from .models import ModelService

log = logging.getLogger(__name__)

Chunked = tuple[ModelVersion, list[DocumentChunks]]  # documents chunked with that embedder version's tokenizer


class CollectionService:
    """Collection and document use cases. Documents are chunked and embedded as bulk work that yields to searches.

    An upsert runs inline while it is small enough to finish within a request's deadline: at most
    ``ingest.inline_max_documents`` documents that chunk into at most ``ingest.inline_max_chunks``
    chunks; a larger one runs as a job. A document over ``ingest.max_document_bytes`` is refused (413).

    Collections are pinned (DESIGN §5): each to the embedder version that made its vectors, whose tokenizer
    chunks its documents and which embeds them (and, in ``SearchService``, its queries). A new collection is
    pinned at creation to the version new work goes to (``ModelService.version``), or at its first ingest when
    the embedder was down at creation. A collection from before pinning is pinned at `start` to the version
    served then (when the embedder is down at start, at its first ingest). Another version only comes by a
    blue/green re-index (`reindex`, `reindex_all`).
    """

    def __init__(
        self,
        registry: CollectionRegistry,
        models: ModelService,
        embedding: Embedding,
        ingest: IngestSettings,
        legacy_jobs_dir: Path | None = None,
        dispatch: Dispatch | None = None,
    ) -> None:
        """``dispatch`` hands jobs to Celery workers (else they run here); ``legacy_jobs_dir``: see `JobRunner`."""
        self._registry = registry
        self._models = models
        self._embedding = embedding
        self._ingest = ingest
        self.jobs = JobRunner(
            registry.catalog,
            self._upsert_now,
            ingest,
            self._embedder_ready,
            reindex=self._reindex_step,
            dispatch=dispatch,
            legacy_jobs_dir=legacy_jobs_dir,
        )

    async def _embedder_ready(self) -> bool:
        try:
            await self._models.version(self._models.names.embedder)
        except UnavailableError:
            return False
        return True

    async def start(self) -> None:
        """Pin the collections from before pinning to the embedder version served now (when none is, each is
        pinned at its first ingest), and resume unfinished jobs."""
        pins = await asyncio.to_thread(self._registry.catalog.pinned_embedders)
        unpinned = [name for name, pinned in pins.items() if pinned is None]
        if unpinned:
            try:
                served = await self._models.version(self._models.names.embedder)
            except UnavailableError:
                log.warning(
                    "%d collections stay unpinned until their first ingest: no embedder is served", len(unpinned)
                )
            else:
                for name in unpinned:
                    await self._registry.pin(name, served)
        await self.jobs.start()

    async def close(self) -> None:
        """Stop the jobs (they resume at the next start)."""
        await self.jobs.close()

    # Collections

    async def _info(self, collection: Collection) -> CollectionInfo:
        stats = await asyncio.to_thread(collection.info)
        created_at = await asyncio.to_thread(self._registry.catalog.collection_created_at, collection.name)
        running = [
            Reindex(embedder=target, job_id=info.id) for info, target in await self.jobs.reindexes(collection.name)
        ]
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
            embedder=collection.embedder,
            created_at=created_at,
            reindex=running[-1] if running else None,
        )

    async def create_collection(self, request: CollectionCreate) -> CollectionInfo:
        """Create an empty collection pinned to the embedder version new work goes to (unpinned while the embedder
        is down); AlreadyExistsError when the name is taken."""
        try:
            embedder = await self._models.version(self._models.names.embedder)
            dimension = await self._models.embedding_dimension(embedder.version)
        except UnavailableError:
            return await self._info(await self._registry.create(request))
        return await self._info(await self._registry.create(request, embedder, dimension))

    async def list_collections(self, prefix: str = "") -> list[CollectionInfo]:
        """The collections whose names start with ``prefix``."""
        names = [name for name in await self._registry.names() if name.startswith(prefix)]
        return [await self._info(await self._registry.get(name)) for name in names]

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self._info(await self._registry.get(name))

    async def delete_collection(self, name: str) -> None:
        """Delete a collection and its files (a re-index of it ends failed); NotFoundError when it does not exist."""
        await self._registry.delete(name)

    # Re-index

    async def reindex(self, collection: str, version: str) -> JobInfo:
        """Re-index ``collection`` blue/green to embedder ``version``, as a job (progress in chunks).

        The job re-embeds every chunk's stored text (after its document's header) with ``version`` into vectors
        side by side with the live ones; searches keep the pinned version until they are complete, writes go on
        (embedded with the pinned version, caught up at the end), then one store transaction switches the vectors
        and the pinned version and the dense index is swapped. A crash leaves the collection on the old version
        (or, after the switch, the new one) and the job resumes at the next start. Returns the running job when
        one already goes to ``version``; InvalidArgumentError when the collection is pinned to it already.
        """
        target = ModelVersion(name=self._models.names.embedder, version=version)
        if (await self._registry.get(collection)).embedder == target:
            raise InvalidArgumentError(
                f"collection {collection!r} is pinned to version {version} already", field="version"
            )
        return await self.jobs.submit_reindex(collection, target)

    async def reindex_all(self, version: str) -> list[JobInfo]:
        """`reindex` every collection not pinned to embedder ``version`` (the running job where there is one), e.g.
        once the rollout controller publishes a new embedder version."""
        target = ModelVersion(name=self._models.names.embedder, version=version)
        pins = await asyncio.to_thread(self._registry.catalog.pinned_embedders)
        return [await self.jobs.submit_reindex(name, target) for name, pinned in pins.items() if pinned != target]

    async def embedder_versions_in_use(self) -> set[str]:
        """The embedder versions collections need served: those they are pinned to, and the targets of running
        re-indexes (the rollout controller keeps each loaded)."""
        pins = await asyncio.to_thread(self._registry.catalog.pinned_embedders)
        targets = [target for _, target in await self.jobs.reindexes()]
        return {pinned.version for pinned in [*pins.values(), *targets] if pinned is not None}

    async def _reindex_step(self, name: str, target: ModelVersion) -> ReindexStep:
        """One step of re-indexing ``name`` to ``target``: re-embed the next batch of chunks that have no next
        vector, or, when none is left, switch; NotFoundError once the collection is deleted."""
        collection = await self._registry.get(name)
        try:
            return await self._reindex_batch(collection, target)
        except Exception as exc:
            if collection.closed:
                raise NotFoundError(f"collection {name!r} was deleted during its re-index") from exc
            raise

    async def _reindex_batch(self, collection: Collection, target: ModelVersion) -> ReindexStep:
        if collection.embedder != target:
            dimension = await self._models.embedding_dimension(target.version)
            progress = await asyncio.to_thread(
                collection.begin_reindex, target, dimension, self._ingest.reindex_batch_chunks
            )
            if progress.missing:
                ids, texts = await asyncio.to_thread(collection.texts, progress.pending)
                vectors = await self._embedding.run(texts, bulk=True, version=target.version)
                added = await asyncio.to_thread(collection.add_next, target, ids, vectors)
                return ReindexStep(progress.total - progress.missing + added, progress.total, finished=False)
            if not await asyncio.to_thread(collection.switch_embedder, target, dimension):
                return ReindexStep(progress.total, progress.total, finished=False)  # written since: catch up
        await self._registry.pin(collection.name, target)
        total = (await asyncio.to_thread(collection.info)).chunks
        return ReindexStep(total, total, finished=True)

    # Documents

    async def _embedder(self, collection: Collection) -> ModelVersion:
        """The version ``collection`` is pinned to; an unpinned one is pinned now to the version new work goes to
        (UnavailableError when no embedder is served)."""
        if collection.embedder is not None:
            return collection.embedder
        return await self._registry.pin(collection.name, await self._models.version(self._models.names.embedder))

    async def _chunk(self, collection: Collection, documents: Sequence[DocumentIn]) -> Chunked:
        """Each document's header and chunks, cut in a worker thread (a long document takes a while) with the
        tokenizer of the version the collection is pinned to."""
        embedder = await self._embedder(collection)
        chunking = collection.spec.chunking
        chunker = await self._models.chunker(chunking, embedder.version)
        chunks = await asyncio.to_thread(lambda: [chunker.chunk_document(doc, chunking.header) for doc in documents])
        return embedder, chunks

    async def _prepare(self, documents: Sequence[DocumentIn], chunked: Chunked) -> list[PreparedDocument]:
        embedder, chunks = chunked
        texts = [with_header(header, span.text) for header, spans in chunks for span in spans]
        vectors = await self._embedding.run(texts, bulk=True, version=embedder.version)
        prepared, start = [], 0
        for doc, (header, spans) in zip(documents, chunks, strict=True):
            prepared.append(PreparedDocument(doc, spans, vectors[start : start + len(spans)], header))
            start += len(spans)
        return prepared

    async def _upsert_now(self, collection_name: str, documents: Sequence[DocumentIn]) -> int:
        """A job's upsert of a batch (`_write`); returns the chunks written."""
        chunks, _ = await self._write(collection_name, documents)
        return chunks

    async def _write(
        self, collection_name: str, documents: Sequence[DocumentIn], chunked: Chunked | None = None
    ) -> tuple[int, int]:
        """Chunk (unless ``chunked`` is given), embed and store ``documents`` with the collection's pinned version;
        returns the chunks written and the write's revision. A re-index that switches the collection meanwhile
        makes it start again."""
        collection = await self._registry.get(collection_name)
        while True:
            if chunked is None or chunked[0] != collection.embedder:
                chunked = await self._chunk(collection, documents)
            prepared = await self._prepare(documents, chunked)
            try:
                revision = await asyncio.to_thread(collection.upsert, prepared, chunked[0])
            except EmbedderChangedError:
                log.info("collection %r switched embedder versions during an upsert; upserting again", collection_name)
                chunked = None
                continue
            return sum(len(p.chunks) for p in prepared), revision

    async def upsert_documents(self, collection: str, request: UpsertRequest) -> UpsertResult:
        """Upsert inline, or as a job when the batch is too large to finish within a request."""
        self._check_sizes(request.documents)
        target = await self._registry.get(collection)
        documents = request.documents
        if len(documents) <= self._ingest.inline_max_documents:
            chunked = await self._chunk(target, documents)
            if sum(len(spans) for _, spans in chunked[1]) <= self._ingest.inline_max_chunks:
                chunks, revision = await self._write(collection, documents, chunked)
                return UpsertResult(collection=collection, documents=len(documents), chunks=chunks, revision=revision)
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

    async def delete_by_filter(self, collection: str, request: DeleteByFilterRequest) -> DeleteByFilterResponse:
        """Delete the documents whose metadata matches the filter; answers how many, and the collection's revision
        then (the deletion's, or a later write's)."""
        target = await self._registry.get(collection)
        deleted = await asyncio.to_thread(target.delete_by_filter, request.filters)
        return DeleteByFilterResponse(deleted=deleted, revision=target.revision)

    async def get_job(self, job_id: str) -> JobInfo:
        return await self.jobs.get(job_id)

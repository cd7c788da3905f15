"""An in-memory stand-in for ``RagCore`` over dicts, for tests of the front-ends."""

from __future__ import annotations

from tritonrag.server.errors import AlreadyExistsError, NotFoundError
from tritonrag.server.schema import (
    And,
    CollectionCreate,
    CollectionInfo,
    Condition,
    DeleteByFilterRequest,
    Document,
    Filter,
    JobInfo,
    JobStatus,
    Metadata,
    ModelVersion,
    SearchHit,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResult,
)

NOW = 1_700_000_000.0


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


class FakeCore:
    """The core's methods over dicts: one chunk per document; a batch over ``inline_max_documents`` becomes a job."""

    def __init__(self, inline_max_documents: int = 2) -> None:
        self.inline_max_documents = inline_max_documents
        self.collections: dict[str, CollectionCreate] = {}
        self.documents: dict[str, dict[str, Document]] = {}
        self.jobs: dict[str, JobInfo] = {}
        self.ready = {"triton": True, "stores": True}
        self.searches: list[SearchRequest] = []

    def _documents(self, collection: str) -> dict[str, Document]:
        if collection not in self.documents:
            raise NotFoundError(f"collection {collection!r} does not exist")
        return self.documents[collection]

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
            generation=len(documents),
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
        documents = self._documents(request.collection).values()
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
            if request.filters is None or matches(request.filters, doc.metadata)
        ]
        return SearchResponse(collection=request.collection, hits=hits[: request.top_k], timings_ms={"total": 1.5})

    async def get_job(self, job_id: str) -> JobInfo:
        if job_id not in self.jobs:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return self.jobs[job_id]

    async def readiness(self) -> dict[str, bool]:
        return dict(self.ready)

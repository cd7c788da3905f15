"""Request and response types of the core, shared by the HTTP and gRPC front-ends.

Validation lives here, once: both front-ends build these models from their wire format,
so a bad field gets the same message over HTTP (422) and gRPC (INVALID_ARGUMENT).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

MetadataValue = str | int | float | bool | list[str] | list[int] | list[float]
Metadata = dict[str, MetadataValue]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
# The HTTP header and gRPC metadata key of a request's id: read from the request (or made up), sent back in the
# answer, and passed on to Triton.
REQUEST_ID_HEADER = "x-request-id"


def _not_blank_query(value: str) -> str:
    if not value.strip():
        raise ValueError("query is empty")
    return value


QueryText = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_not_blank_query)]


class IndexType(StrEnum):
    """FAISS index family; ``auto`` picks by collection size."""

    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    auto = "auto"


class Language(StrEnum):
    """How a collection's lexical index analyses text: that language's stop words and Snowball stemmer, or
    ``none`` (words as they are, lower-cased)."""

    none = "none"
    arabic = "arabic"
    danish = "danish"
    dutch = "dutch"
    english = "english"
    finnish = "finnish"
    french = "french"
    german = "german"
    greek = "greek"
    hungarian = "hungarian"
    italian = "italian"
    norwegian = "norwegian"
    portuguese = "portuguese"
    romanian = "romanian"
    russian = "russian"
    spanish = "spanish"
    swedish = "swedish"
    tamil = "tamil"
    turkish = "turkish"


class SearchMode(StrEnum):
    dense = "dense"
    sparse = "sparse"
    hybrid = "hybrid"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunkHeader(Strict):
    """A short header from a chunk's document, put before the chunk's text where the chunk is embedded and
    indexed (never in the stored or returned text): the document's ``metadata_field`` when it is text, else
    (``first_line``) its first non-blank line, on one line, cut at ``max_tokens`` embedder tokens. No header:
    ``metadata_field`` null (or "") and ``first_line`` false."""

    metadata_field: str | None = Field("title", max_length=64)
    first_line: bool = True
    max_tokens: int = Field(32, ge=1, le=64)


NO_HEADER = ChunkHeader(metadata_field=None, first_line=False)


class Chunking(Strict):
    """How documents are cut: windows of the embedder's tokens, with overlap. A header's tokens count toward
    ``chunk_tokens`` (a header is cut at a quarter of them, and to leave a window longer than the overlap)."""

    chunk_tokens: int = Field(200, ge=16, le=512)
    overlap_tokens: int = Field(40, ge=0, le=256)
    header: ChunkHeader = ChunkHeader()

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Chunking:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class CollectionCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    chunking: Chunking = Chunking()
    index_type: IndexType = IndexType.auto
    language: Language = Language.english  # the lexical index's stop words and stemming


class ModelVersion(BaseModel):
    name: str
    version: str


class CollectionInfo(BaseModel):
    name: str
    chunking: Chunking
    index_type: IndexType
    language: Language
    active_index: str
    documents: int
    chunks: int
    size_bytes: int
    revision: int  # bumped by every write to the collection
    embedder: ModelVersion | None
    created_at: float


class DocumentIn(Strict):
    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    metadata: Metadata = {}

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value


class Document(BaseModel):
    id: str
    text: str
    metadata: Metadata
    chunks: int
    updated_at: float


class UpsertRequest(Strict):
    documents: list[DocumentIn] = Field(min_length=1)

    @field_validator("documents")
    @classmethod
    def _unique_ids(cls, documents: list[DocumentIn]) -> list[DocumentIn]:
        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} appears twice in one request")
            seen.add(doc.id)
        return documents


class UpsertResult(BaseModel):
    collection: str
    documents: int
    chunks: int
    job_id: str | None = None


class Condition(Strict):
    """One metadata test: ``eq``/``in`` on any value, ``gt``/``gte``/``lt``/``lte`` on numbers."""

    field: str = Field(min_length=1, max_length=128)
    op: Literal["eq", "in", "gt", "gte", "lt", "lte"]
    value: MetadataValue

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("'in' takes a list value")
        if self.op in ("gt", "gte", "lt", "lte") and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float)
        ):
            raise ValueError(f"'{self.op}' takes a number")
        return self


class And(Strict):
    and_: list[Filter] = Field(alias="and", min_length=1)


class Or(Strict):
    or_: list[Filter] = Field(alias="or", min_length=1)


def _filter_kind(value: Any) -> str:
    """Which filter model a value is: ``and``/``or`` by key, else a condition."""
    if isinstance(value, dict):
        return "and" if "and" in value else "or" if "or" in value else "condition"
    return "and" if isinstance(value, And) else "or" if isinstance(value, Or) else "condition"


Filter = Annotated[
    Annotated[Condition, Tag("condition")] | Annotated[And, Tag("and")] | Annotated[Or, Tag("or")],
    Discriminator(_filter_kind),
]
And.model_rebuild()
Or.model_rebuild()


class DeleteByFilterRequest(Strict):
    filters: Filter


class GroupBy(StrEnum):
    """What a search returns k of: chunks, or documents (each its best chunk, its other matching chunks listed)."""

    chunk = "chunk"
    document = "document"


class FusionMethod(StrEnum):
    """How a hybrid search merges its rankings: reciprocal rank fusion, or a weighted sum of scores
    normalised per ranking (min-max to [0, 1], or z-scores)."""

    rrf = "rrf"
    minmax = "minmax"
    zscore = "zscore"


class Fusion(Strict):
    """The fusion method and each ranking's weight: ``dense`` (vector similarity), ``sparse`` (BM25 of
    chunks) and ``document`` (BM25 of whole documents, each chunk ranked as its document). A weight of 0
    leaves its ranking out; a dense search uses its one ranking, a sparse one the two lexical rankings.
    The defaults were chosen on two evaluation sets (docs/BENCHMARKS.md, "Retrieval quality")."""

    method: FusionMethod = FusionMethod.zscore
    dense: float = Field(0.6, ge=0.0, le=1.0)
    sparse: float = Field(0.4, ge=0.0, le=1.0)
    document: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_weight(self) -> Fusion:
        if self.dense + self.sparse + self.document <= 0:
            raise ValueError("at least one fusion weight must be above 0")
        return self


class Mmr(Strict):
    lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0)


class SearchRequest(Strict):
    collection: str = Field(pattern=NAME_PATTERN)
    query: QueryText
    top_k: int = Field(10, ge=1, le=100)
    mode: SearchMode = SearchMode.hybrid
    fusion: Fusion = Fusion()
    filters: Filter | None = None
    rerank: bool = False
    rerank_top_n: int = Field(20, ge=1, le=200)
    mmr: Mmr | None = None
    group_by: GroupBy = GroupBy.chunk
    use_cache: bool = True  # false: computed afresh, never served from the cache (the fresh result is stored)


class SearchHit(BaseModel):
    doc_id: str
    chunk_id: int
    text: str
    start: int
    end: int
    metadata: Metadata
    score: float
    scores: dict[str, float]
    # group_by "document": the document's other chunks among the candidates, best first
    other_chunk_ids: list[int] = []


class SearchResponse(BaseModel):
    collection: str
    hits: list[SearchHit]
    timings_ms: dict[str, float]
    degraded: list[str] = []


class DocumentError(BaseModel):
    doc_id: str
    error: str


class JobInfo(BaseModel):
    id: str
    collection: str
    status: JobStatus
    total: int
    done: int
    failed: int
    errors: list[DocumentError]
    created_at: float
    updated_at: float


# Generation


class FinishReason(StrEnum):
    """Why a generation ended: a stop token or string, ``max_tokens``, or the client went away."""

    stop = "stop"
    length = "length"
    cancelled = "cancelled"


class SamplingParams(Strict):
    """Sampling parameters, as the generator model takes them (its ``PARAMETERS`` input, as JSON).

    ``temperature`` 0 is greedy decoding; the same ``seed`` with the same input gives the same output.
    ``max_tokens`` None means as many as the context window leaves.
    """

    max_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000)  # 0: no top-k cut
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in stop):
            raise ValueError("stop strings are at most 256 characters")
        return stop


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationDelta(BaseModel):
    """One streamed piece of a generation; the last one has ``finish_reason`` and the final token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


# RAG answers


class Grounding(Strict):
    """Where a grounded answer takes its context from: a retrieval over one collection."""

    collection: str = Field(pattern=NAME_PATTERN)
    top_k: int = Field(5, ge=1, le=50)  # passages retrieved and offered to the generator, best first
    mode: SearchMode = SearchMode.hybrid
    fusion: Fusion = Fusion()
    filters: Filter | None = None
    rerank: bool = False


class QueryRequest(Grounding):
    """``POST /v1/query``: retrieve, pack the passages into the generator's context, answer with citations."""

    query: QueryText
    # ``generation`` is this field's name before 0.2, still accepted.
    sampling: SamplingParams = Field(
        SamplingParams(max_tokens=256), validation_alias=AliasChoices("sampling", "generation")
    )
    stream: bool = False
    use_cache: bool = True  # false: answered afresh, never from the cache (the fresh answer is stored)


class Source(BaseModel):
    """A passage given to the generator, numbered as the answer cites it (``[citation]``)."""

    citation: int
    doc_id: str
    chunk_id: int
    text: str
    start: int
    end: int
    metadata: Metadata
    score: float
    cited: bool = False  # the answer refers to it

    @classmethod
    def of(cls, hit: SearchHit, citation: int) -> Source:
        """The search hit ``hit`` as the passage numbered ``citation``."""
        return cls(citation=citation, **hit.model_dump(exclude={"scores"}))


class QueryResponse(BaseModel):
    collection: str
    answer: str
    sources: list[Source]
    dropped_passages: int  # retrieved but left out: they did not fit the context window
    usage: Usage
    finish_reason: FinishReason
    timings_ms: dict[str, float]  # embed, search, rerank, generate, total
    degraded: list[str] = []


class SourcesEvent(BaseModel):
    """First event of a streamed answer."""

    type: Literal["sources"] = "sources"
    sources: list[Source]
    dropped_passages: int
    degraded: list[str] = []


class DeltaEvent(BaseModel):
    """A piece of the answer's text."""

    type: Literal["delta"] = "delta"
    text: str


class DoneEvent(BaseModel):
    """Last event of a streamed answer."""

    type: Literal["done"] = "done"
    usage: Usage
    finish_reason: FinishReason
    timings_ms: dict[str, float]
    cited: list[int]  # citation numbers the answer used
    degraded: list[str] = []


QueryEvent = SourcesEvent | DeltaEvent | DoneEvent


class Embeddings(BaseModel):
    """Vectors of texts, in order, from one embedder version."""

    model: ModelVersion
    vectors: list[list[float]]
    prompt_tokens: int


# The cache


class CacheCounts(BaseModel):
    """One cache level's counts for one tier since the start; ``entries`` and ``bytes`` only where cheap (L1)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # L2 only: Redis failed, and the request went on without it
    entries: int | None = None
    bytes: int | None = None


class CacheStats(BaseModel):
    """``GET /v1/cache/stats``: per level ("l1", "l2") and tier ("query_embedding", "chunk_embedding", "search",
    "answer", "chat") the counts; ``coalesced`` per tier: misses that waited for an identical one in flight."""

    enabled: bool
    redis: bool  # an L2 is configured
    levels: dict[str, dict[str, CacheCounts]]
    coalesced: dict[str, int]


class CacheFlushed(BaseModel):
    """``POST /v1/cache:flush``: the entries removed from this process's L1 and the keys deleted from L2."""

    l1: int
    l2: int | None  # None: no L2 configured, or Redis could not be reached

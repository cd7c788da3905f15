"""Request and response types of the core, shared by the HTTP and gRPC front-ends.

Validation lives here, once: both front-ends build these models from their wire format,
so a bad field gets the same message over HTTP (422) and gRPC (INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    FiniteFloat,
    Tag,
    field_validator,
    model_validator,
)

# Numbers are finite: JSON has no NaN nor infinity, and SQLite would store a NaN as NULL.
MetadataValue = str | int | FiniteFloat | bool | list[str] | list[int] | list[FiniteFloat]
Metadata = dict[str, MetadataValue]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
# The HTTP header and gRPC metadata key of a request's id: read from the request (or made up), sent back in the
# answer, and passed on to Triton.
REQUEST_ID_HEADER = "x-request-id"

# Limits on requests (docs/SERVER.md, "Limits"): what real use needs, well inside what the services handle.
MAX_QUERY_CHARS = 4096  # a search query or a question, before control characters are removed
MAX_UPSERT_DOCUMENTS = 10_000  # per upsert request; over ``ingest.inline_max_documents`` they run as a job
MAX_METADATA_BYTES = 16 * 1024  # a document's metadata as compact UTF-8 JSON
MAX_FIELD_CHARS = 128  # a metadata key, and the field a filter condition names
MAX_FILTER_CONDITIONS = 64  # conditions in one filter
MAX_FILTER_DEPTH = 8  # levels of a filter: a condition is 1, an ``and``/``or`` one more than its deepest part
MAX_IN_VALUES = 1024  # values of one ``in`` condition
# Values of all of a filter's conditions: each is an SQL parameter, and SQLite's default limit is 32,766.
MAX_FILTER_VALUES = 8192
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_CHAT_MESSAGES = 1024  # messages of one chat
MAX_MESSAGE_CHARS = 1_000_000  # one chat message's content

_LINE_BREAK = re.compile(r"\r\n?")
# C0 and C1 control characters but tab and line feed: those that Python counts as whitespace (vertical tab,
# form feed, the separators \x1c-\x1f, next line) become a space, the others go.
_SPACING_CONTROL = re.compile(r"[\x0b\x0c\x1c-\x1f\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_ID_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: none in a document id


def clean_query(text: str) -> str:
    """``text`` in Unicode NFC, line breaks as ``\\n``, control characters other than tab and line feed removed
    (those that separate words as a space), without leading or trailing whitespace."""
    text = _CONTROL.sub("", _SPACING_CONTROL.sub(" ", _LINE_BREAK.sub("\n", text)))
    return unicodedata.normalize("NFC", text).strip()


def _cleaned_query(value: str) -> str:
    cleaned = clean_query(value)
    if not cleaned:
        raise ValueError("query is empty once control characters and surrounding whitespace are removed")
    return cleaned


# Every front-end gets the same cleaned query: it is searched, cached and put in prompts as it is here.
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(_cleaned_query)]


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


class Reindex(BaseModel):
    """A collection's running blue/green re-index: the embedder version it moves to, and its job."""

    embedder: ModelVersion
    job_id: str


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
    embedder: ModelVersion | None  # the version the collection is pinned to (that made its vectors); None until pinned
    created_at: float
    reindex: Reindex | None = None  # while a re-index to another embedder version runs


def _flat_value(value: Any) -> Any:
    """Refuse an object or a nested list as a metadata value with one message (the type alone answers one per
    type a value may take)."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(i, dict | list) for i in value)):
        raise ValueError("metadata values are strings, numbers, booleans or flat lists of them, not nested")
    return value


def _short_keys(value: Any) -> Any:
    for key in value if isinstance(value, dict) else ():
        if isinstance(key, str) and len(key) > MAX_FIELD_CHARS:
            raise ValueError(f"metadata key of {len(key)} characters is over the limit of {MAX_FIELD_CHARS}")
    return value


def _metadata_size(metadata: Metadata) -> Metadata:
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata of {size} bytes (as JSON) is over the limit of {MAX_METADATA_BYTES}")
    return metadata


# A document's metadata as a request gives it: flat, its keys and its size bounded.
MetadataIn = Annotated[
    dict[str, Annotated[MetadataValue, BeforeValidator(_flat_value)]],
    BeforeValidator(_short_keys),
    AfterValidator(_metadata_size),
]


class DocumentIn(Strict):
    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    metadata: MetadataIn = {}

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty")
        return value

    @field_validator("id")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        # An id names its document in URLs, where a line feed ends a path parameter, and in SQL lists, where
        # a NUL ends the text: such a document could be written once, and then not read, replaced or deleted.
        if _ID_CONTROL.search(value):
            raise ValueError("a document id holds no control characters")
        return value


class Document(BaseModel):
    id: str
    text: str
    metadata: Metadata
    chunks: int
    updated_at: float


class UpsertRequest(Strict):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_UPSERT_DOCUMENTS)

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
    # The collection's revision once an inline upsert is searchable (pass it as ``min_revision`` to read this
    # write through any replica); None for a job, whose documents land later.
    revision: int | None = None


class Condition(Strict):
    """One metadata test: ``eq``/``in`` on any value, ``gt``/``gte``/``lt``/``lte`` on numbers."""

    field: str = Field(min_length=1, max_length=MAX_FIELD_CHARS)
    op: Literal["eq", "in", "gt", "gte", "lt", "lte"]
    value: MetadataValue

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("'in' takes a list value")
        if isinstance(self.value, list) and len(self.value) > MAX_IN_VALUES:
            raise ValueError(f"'{self.op}' list of {len(self.value)} values is over the limit of {MAX_IN_VALUES}")
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


def _filter_parts(node: Any) -> list[Any]:
    """The parts of an ``and``/``or`` (given as a model or as its JSON form), none of a condition."""
    if isinstance(node, And | Or):
        return list(node.and_ if isinstance(node, And) else node.or_)
    if isinstance(node, dict):
        parts = node.get("and", node.get("or"))
        return parts if isinstance(parts, list) else []
    return []


def _condition_values(node: Any) -> int:
    """How many values a condition (a model or its JSON form) holds: its list's length, else 1."""
    value = node.value if isinstance(node, Condition) else node.get("value") if isinstance(node, dict) else None
    return len(value) if isinstance(value, list) else 1


def _walk_filter(root: Any) -> Iterator[tuple[Any, int]]:
    """Every node of a filter with its depth (the root's is 1), breadth first, without recursion."""
    level, depth = [root], 1
    while level:
        yield from ((node, depth) for node in level)
        level, depth = [part for node in level for part in _filter_parts(node)], depth + 1


def _bounded_filter(value: Any) -> Any:
    """Refuse a filter over ``MAX_FILTER_DEPTH``, ``MAX_FILTER_CONDITIONS`` or ``MAX_FILTER_VALUES`` before
    validating it: a filter nested deeper than any real one is refused as such, however deep it goes."""
    conditions = values = 0
    for node, depth in _walk_filter(value):
        if depth > MAX_FILTER_DEPTH:
            raise ValueError(f"filter nesting depth {depth} is over the limit of {MAX_FILTER_DEPTH}")
        if not _filter_parts(node):
            conditions, values = conditions + 1, values + _condition_values(node)
    if conditions > MAX_FILTER_CONDITIONS:
        raise ValueError(f"filter of {conditions} conditions is over the limit of {MAX_FILTER_CONDITIONS}")
    if values > MAX_FILTER_VALUES:
        raise ValueError(f"filter of {values} values is over the limit of {MAX_FILTER_VALUES}")
    return value


# A filter as a request gives it, within the limits on its size.
BoundedFilter = Annotated[Filter, BeforeValidator(_bounded_filter)]


class DeleteByFilterRequest(Strict):
    filters: BoundedFilter


class DeleteByFilterResponse(BaseModel):
    deleted: int  # documents removed
    revision: int | None = None  # the collection's revision once the deletion is searchable (as in UpsertResult)


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


class FusionWeights(Strict):
    """Each ranking's weight: ``dense`` (vector similarity), ``sparse`` (BM25 of chunks) and ``document`` (BM25
    of whole documents, each chunk ranked as its document). A weight of 0 leaves its ranking out."""

    dense: float = Field(0.7, ge=0.0, le=1.0)
    sparse: float = Field(0.3, ge=0.0, le=1.0)
    document: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_weight(self) -> FusionWeights:
        if self.dense + self.sparse + self.document <= 0:
            raise ValueError("at least one fusion weight must be above 0")
        return self


class VerbatimWeights(FusionWeights):
    """The weights of a query found word for word in the collection (`Fusion.verbatim`): the lexical rankings
    lead."""

    dense: float = Field(0.1, ge=0.0, le=1.0)
    sparse: float = Field(0.2, ge=0.0, le=1.0)
    document: float = Field(0.4, ge=0.0, le=1.0)


class Fusion(FusionWeights):
    """The fusion method and the rankings' weights. A dense search uses its one ranking, a sparse one the two
    lexical rankings.

    ``verbatim``: the weights used instead when some text of the collection (among those the filters allow)
    holds the query's words in order, at least 3 of them after stop words (a pasted sentence, error message or
    name): such a query is answered by its words more than by its meaning. By default it weighs the lexical
    rankings; a request that sets any of ``dense``, ``sparse`` or ``document`` and not ``verbatim`` gets its
    weights for every query (``verbatim: null`` too). The defaults were chosen on three evaluation sets
    (docs/BENCHMARKS.md, "Retrieval quality")."""

    method: FusionMethod = FusionMethod.zscore
    verbatim: VerbatimWeights | None = VerbatimWeights()

    @model_validator(mode="before")
    @classmethod
    def _own_weights_throughout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "verbatim" not in data and data.keys() & {"dense", "sparse", "document"}:
            return {**data, "verbatim": None}
        return data

    def weights(self, verbatim: bool) -> FusionWeights:
        """The weights for a query found word for word in the collection (``verbatim``), or for any other."""
        return self.verbatim if verbatim and self.verbatim is not None else self


class Mmr(Strict):
    lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0)


class SearchRequest(Strict):
    collection: str = Field(pattern=NAME_PATTERN)
    query: QueryText
    top_k: int = Field(10, ge=1, le=100)
    mode: SearchMode = SearchMode.hybrid
    fusion: Fusion = Fusion()
    filters: BoundedFilter | None = None
    rerank: bool = False
    rerank_top_n: int = Field(20, ge=1, le=200)
    mmr: Mmr | None = None
    group_by: GroupBy = GroupBy.chunk
    use_cache: bool = True  # false: computed afresh, never served from the cache (the fresh result is stored)
    # Search the collection at this revision or a later one (a write's ``revision``): read your own write
    # through any replica. Ahead of the store's revision: 422 naming the field.
    min_revision: int | None = Field(None, ge=0)


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
    flags: list[str] = []  # the prompt-injection rules its text matches (docs/SERVER.md, "Prompt injection")


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
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str]) -> list[str]:
        for i, string in enumerate(stop):
            if not string:
                raise ValueError("stop strings must not be empty")
            if len(string) > MAX_STOP_CHARS:
                raise ValueError(f"stop string {i} of {len(string)} characters is over the limit of {MAX_STOP_CHARS}")
        return stop


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


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
    filters: BoundedFilter | None = None
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
    min_revision: int | None = Field(None, ge=0)  # as in SearchRequest


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
    flags: list[str] = []  # the prompt-injection rules its text matches (docs/SERVER.md, "Prompt injection")

    @classmethod
    def of(cls, hit: SearchHit, citation: int) -> Source:
        """The search hit ``hit`` as the passage numbered ``citation``."""
        return cls(citation=citation, **hit.model_dump(exclude={"scores"}))


class FlaggedPassage(BaseModel):
    """A retrieved passage left out of the prompt for the prompt-injection rules it matches."""

    doc_id: str
    chunk_id: int
    flags: list[str]


class Injection(BaseModel):
    """What the prompt-injection heuristics found in an answer's input (docs/SERVER.md, "Prompt injection"):
    the rules the query matches, and the passages left out of the prompt for theirs (``query.injection.mode``
    drop or block); a passage given to the generator has its own in ``Source.flags``."""

    query: list[str] = []
    dropped: list[FlaggedPassage] = []


class QueryResponse(BaseModel):
    collection: str
    answer: str
    sources: list[Source]
    dropped_passages: int  # retrieved but left out: they did not fit the context window
    usage: Usage
    finish_reason: FinishReason
    timings_ms: dict[str, float]  # embed, search, rerank, generate, total
    degraded: list[str] = []
    injection: Injection = Injection()


class SourcesEvent(BaseModel):
    """First event of a streamed answer."""

    type: Literal["sources"] = "sources"
    sources: list[Source]
    dropped_passages: int
    degraded: list[str] = []
    injection: Injection = Injection()


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

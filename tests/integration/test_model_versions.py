"""Self-contained versions: each version serves with the runtime code it was exported with, whatever is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests import tiny_models
from tests.serving import running_triton, text_input
from tritonrag.deploy.launcher import config_for_device, gpu_visible, load_model_config
from tritonrag.export.exporter import ExportResult, export_model
from tritonrag.export.repository import RUNTIME_PACKAGE, check_version_dir, runtime_digest
from tritonrag.export.runtime.encoding import ModelTokenizer

TEXTS = ["Hi.", "What is the capital of France?", "Paris is the capital and most populous city of France."]
# The line of text_model.py that cuts a request's rows out of the batch; a later runtime negates them.
ROWS_LINE = "chunk = values[start : start + len(item)].reshape(len(item), -1)"


@pytest.fixture(scope="module")
def later_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime of a later tritonrag that behaves differently: the embedder's vectors come out negated."""
    runtime = tmp_path_factory.mktemp("later") / "runtime"
    shutil.copytree(RUNTIME_PACKAGE, runtime, ignore=shutil.ignore_patterns("__pycache__"))
    text_model = runtime / "text_model.py"
    source = text_model.read_text()
    assert source.count(ROWS_LINE) == 1
    text_model.write_text(source.replace(ROWS_LINE, ROWS_LINE.replace("= values", "= -values")))
    return runtime


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, later_runtime: Path) -> list[ExportResult]:
    """The tiny embedder exported with the installed runtime (version 1), then with the later one (version 2)."""
    folder = tiny_models.tiny_embedder(tmp_path_factory.mktemp("sources") / "embedder")
    repository = tmp_path_factory.mktemp("repository")
    source = f"path:{folder}"
    return [
        export_model(source, "embedder", repository, max_sequence_length=32),
        export_model(source, "embedder", repository, max_sequence_length=32, runtime_dir=later_runtime),
    ]


def onnx_embeddings(version_dir: Path, texts: list[str]) -> npt.NDArray[np.float32]:
    """The version's graph under ONNX Runtime in this process, without Triton or any runtime copy."""
    tokenizer = ModelTokenizer.from_version_dir(version_dir)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    result: npt.NDArray[np.float32] = session.run(None, tokenizer.pad([tokenizer.encode_text(t) for t in texts]))[0]
    return result


def test_each_version_holds_and_records_its_runtime(versions: list[ExportResult], later_runtime: Path) -> None:
    first, second = versions
    for result, runtime in ((first, RUNTIME_PACKAGE), (second, later_runtime)):
        metadata = check_version_dir(result.version_dir, "embedder")
        assert metadata["runtime"] == runtime_digest(runtime) == runtime_digest(result.version_dir / "runtime")
        assert metadata["runtime"]["files"] == len(list(RUNTIME_PACKAGE.glob("*.py"))) >= 10
        model_py = (result.version_dir / "model.py").read_text()
        assert model_py == "from .runtime.embedder import TritonPythonModel  # noqa: F401\n"
        assert not list(result.version_dir.rglob("__pycache__"))
    assert runtime_digest(RUNTIME_PACKAGE) != runtime_digest(later_runtime)


def test_a_version_imports_nothing_of_tritonrag(versions: list[ExportResult]) -> None:
    """``1.model`` imported as the Python backend does, in an isolated interpreter where tritonrag cannot load."""
    script = (
        "import importlib, sys, types\n"
        "sys.modules['tritonrag'] = None\n"
        "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')\n"
        f"sys.path.insert(0, {str(versions[0].version_dir.parent)!r})\n"
        "model = importlib.import_module('1.model')\n"
        "loaded = sorted(m for m, module in sys.modules.items() if m.startswith('tritonrag') and module)\n"
        "print(model.TritonPythonModel.__module__, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-B", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1.runtime.text_model", "[]"]


def test_an_old_version_serves_unchanged_beside_one_from_a_later_runtime(
    versions: list[ExportResult], tmp_path: Path
) -> None:
    """Versions 1 and 2 side by side in one tritonserver: version 1 still returns its graph's vectors, version 2
    the later runtime's negated ones; each runs the runtime copied into it, not the installed one."""
    repository = versions[0].version_dir.parent.parent
    with running_triton(repository, ["embedder"], tmp_path / "triton") as server:
        client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
        config = load_model_config(repository, "embedder")
        config.version_policy.specific.versions[:] = [1, 2]
        client.load_model("embedder", config=json.dumps(config_for_device(config, gpu_visible())))
        served = {
            version: client.infer("embedder", [text_input("TEXT", TEXTS)], model_version=version).as_numpy("EMBEDDING")
            for version in ("1", "2")
        }
        client.close()
    expected = onnx_embeddings(versions[0].version_dir, TEXTS)
    assert expected.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(served["1"], expected, atol=1e-5)
    np.testing.assert_allclose(served["2"], -expected, atol=1e-5)

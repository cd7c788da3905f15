"""``check_version_dir`` on hand-built version directories: a whole one passes, each fault is named; runtime hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tritonrag.export.errors import ExportError
from tritonrag.export.repository import (
    RUNTIME_PACKAGE,
    check_onnx_file,
    check_version_dir,
    parity_failure,
    runtime_digest,
    write_runtime,
)

PARITY = {"metric": "cosine_min", "value": 0.99999, "alone_vs_batched": 0.99998, "threshold": 0.9999, "rows": 8}
RERANKER_PARITY = {"metric": "max_abs_diff", "value": 2e-6, "alone_vs_batched": 1e-6, "threshold": 1e-3}


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


# A ModelProto's top level: ir_version 10, producer_name, graph (its contents are not read), opset_import 17.
ONNX_BYTES = b"\x08\x0a" + field(2, b"pytorch") + field(7, field(2, b"main_graph")) + field(8, b"\x10\x11")


def read_metadata(version_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((version_dir / "tritonrag.json").read_text())
    return loaded


def write_metadata(version_dir: Path, **changes: Any) -> None:
    (version_dir / "tritonrag.json").write_text(json.dumps({**read_metadata(version_dir), **changes}))


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    """A whole embedder version: the real runtime, a minimal ONNX model, passed parity."""
    version_dir = tmp_path / "embedder" / "1"
    version_dir.mkdir(parents=True)
    runtime = write_runtime(version_dir, "embedder")
    (version_dir / "model.onnx").write_bytes(ONNX_BYTES)
    (version_dir / "tokenizer.json").write_text("{}")
    metadata = {"task": "embedder", "runtime": runtime, "quantization": None, "parity": PARITY}
    (version_dir / "tritonrag.json").write_text(json.dumps(metadata))
    return version_dir


def test_a_whole_version_passes_and_its_metadata_is_returned(version_dir: Path) -> None:
    metadata = check_version_dir(version_dir, "embedder")
    assert metadata == read_metadata(version_dir)
    assert metadata["runtime"] == runtime_digest(RUNTIME_PACKAGE)
    assert metadata["runtime"]["files"] == len(list(RUNTIME_PACKAGE.glob("*.py")))
    assert (version_dir / "model.py").read_text() == "from .runtime.embedder import TritonPythonModel  # noqa: F401\n"
    assert sorted(p.name for p in (version_dir / "runtime").iterdir()) == sorted(
        p.name for p in RUNTIME_PACKAGE.glob("*.py")
    )


def test_python_caches_written_while_serving_do_not_change_the_hash(version_dir: Path) -> None:
    cache = version_dir / "runtime" / "__pycache__"
    cache.mkdir()
    (cache / "embedder.cpython-311.pyc").write_bytes(b"\x00compiled")
    (cache / "stray.py").write_text("ignored with its folder")
    assert check_version_dir(version_dir, "embedder")["runtime"] == runtime_digest(RUNTIME_PACKAGE)


def test_the_runtime_hash_covers_relative_paths_sizes_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.py").write_text("yy")
    (tmp_path / "sub" / "a.py").write_text("x")
    (tmp_path / "notes.txt").write_text("not Python: left out")
    expected = hashlib.sha256(b"b.py\x002\x00yy" + b"sub/a.py\x001\x00x").hexdigest()
    assert runtime_digest(tmp_path) == {"sha256": expected, "files": 2}
    (tmp_path / "b.py").write_text("y")
    (tmp_path / "sub" / "a.py").write_text("yx")  # the same bytes in all, split differently
    assert runtime_digest(tmp_path)["sha256"] != expected


def test_a_runtime_without_the_task_module_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "contract.py").write_text("")
    with pytest.raises(ExportError, match=r"the runtime at .*/runtime has no embedder\.py"):
        write_runtime(tmp_path / "version", "embedder", tmp_path / "runtime")


def _remove(name: str) -> Callable[[Path], object]:
    return lambda version_dir: (version_dir / name).unlink()


def _remove_runtime(version_dir: Path) -> None:
    for path in (version_dir / "runtime").iterdir():
        path.unlink()
    (version_dir / "runtime").rmdir()


def _tamper_runtime(version_dir: Path) -> None:
    text_model = version_dir / "runtime" / "text_model.py"
    text_model.write_text(text_model.read_text() + "\n# changed after export\n")


def _truncate_onnx(version_dir: Path) -> None:
    (version_dir / "model.onnx").write_bytes(ONNX_BYTES[:15])  # cut inside the graph


FAULTS: list[tuple[str, Callable[[Path], object], str]] = [
    ("no metadata", _remove("tritonrag.json"), r"1/tritonrag\.json cannot be read as JSON: .*No such file"),
    (
        "unparsable metadata",
        lambda d: (d / "tritonrag.json").write_text('{"task": '),
        r"1/tritonrag\.json cannot be read as JSON: Expecting value",
    ),
    ("metadata not an object", lambda d: (d / "tritonrag.json").write_text("[]"), r"tritonrag\.json holds list"),
    (
        "another task",
        lambda d: write_metadata(d, task="reranker"),
        r"tritonrag\.json: the task is 'reranker', expected 'embedder'",
    ),
    ("no graph", _remove("model.onnx"), r"1/model\.onnx is missing"),
    ("no tokenizer", _remove("tokenizer.json"), r"1/tokenizer\.json is missing"),
    ("no model.py", _remove("model.py"), r"1/model\.py is missing"),
    ("no runtime", _remove_runtime, r"1/runtime/ is missing"),
    ("runtime changed", _tamper_runtime, r"1/runtime/ hashes to .*: the runtime was changed or not wholly copied"),
    ("runtime half copied", _remove("runtime/sampling.py"), r"'files': \d+}, but .*tritonrag\.json records"),
    ("runtime not recorded", lambda d: write_metadata(d, runtime=None), r"tritonrag\.json records None"),
    ("graph truncated", _truncate_onnx, r"1/model\.onnx is truncated: its last field ends at byte 25, the file at 15"),
    (
        "graph cut inside a field header",
        lambda d: (d / "model.onnx").write_bytes(b"\x08"),
        r"model\.onnx is truncated: it ends inside a protobuf field",
    ),
    (
        "not a graph",
        lambda d: (d / "model.onnx").write_bytes(b"\x0f not protobuf"),
        r"model\.onnx is not an ONNX model: protobuf field 1 has wire type 7",
    ),
    (
        "no graph in the model",
        lambda d: (d / "model.onnx").write_bytes(b"\x08\x0a" + field(8, b"\x10\x11")),
        r"model\.onnx is not an ONNX model: it has no graph",
    ),
    (
        "parity failed",
        lambda d: write_metadata(d, parity={**PARITY, "value": 0.95}),
        r"the float32 parity check failed: cosine_min \[0\.95, 0\.99998\] against the threshold 0\.9999",
    ),
    (
        "padding changed the output",
        lambda d: write_metadata(d, parity={**PARITY, "alone_vs_batched": 0.9}),
        r"the float32 parity check failed: cosine_min \[0\.99999, 0\.9\]",
    ),
    ("no parity report", lambda d: write_metadata(d, parity=None), r"the float32 parity check has no report: None"),
    (
        "int8 parity failed",
        lambda d: write_metadata(
            d, quantization={"method": "dynamic", "weights": "int8", "parity": {**PARITY, "value": 0.5}}
        ),
        r"the int8 parity check failed: cosine_min \[0\.5\]",
    ),
    (
        "int8 without a report",
        lambda d: write_metadata(d, quantization={"method": "dynamic", "weights": "int8"}),
        r"the int8 parity check has no report: None",
    ),
]


@pytest.mark.parametrize(("fault", "message"), [(f, m) for _, f, m in FAULTS], ids=[i for i, _, _ in FAULTS])
def test_each_fault_is_named(version_dir: Path, fault: Callable[[Path], object], message: str) -> None:
    fault(version_dir)
    with pytest.raises(ExportError, match=message):
        check_version_dir(version_dir, "embedder")


def test_an_int8_report_without_threshold_only_reports(version_dir: Path) -> None:
    report_only = {"metric": "max_abs_diff", "value": 0.4, "same_order": False, "threshold": None}
    write_metadata(version_dir, quantization={"method": "dynamic", "weights": "int8", "parity": report_only})
    assert check_version_dir(version_dir, "embedder")["quantization"]["parity"] == report_only


@pytest.mark.parametrize(
    ("report", "float32", "failure"),
    [
        (RERANKER_PARITY, True, None),
        ({**RERANKER_PARITY, "value": 2e-3}, True, "failed: max_abs_diff [0.002, 1e-06] against the threshold 0.001"),
        ({**RERANKER_PARITY, "same_order": False}, True, "failed: the scores' order differs from PyTorch's"),
        ({**RERANKER_PARITY, "same_order": False}, False, None),  # int8: alone_vs_batched and order not judged
        ({**RERANKER_PARITY, "alone_vs_batched": 0.5}, False, None),
        ({"metric": "greedy_identical", "value": 1.0, "threshold": 1.0}, True, None),
        ({"metric": "greedy_identical", "value": 0.75, "threshold": 1.0}, True, "failed: greedy_identical [0.75]"),
        ({"metric": "bleu", "value": 1.0, "threshold": 1.0}, True, "has no report: {'metric': 'bleu'"),
        ({**PARITY, "value": "high"}, True, "has non-numeric values"),
    ],
)
def test_parity_reports_are_judged_as_the_export_judged_them(
    report: dict[str, Any], float32: bool, failure: str | None
) -> None:
    found = parity_failure(report, float32)
    assert found == failure if failure is None else (found or "").startswith(failure)


def test_a_long_varint_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08" + b"\xff" * 11)
    with pytest.raises(ExportError, match="a protobuf varint runs over 10 bytes"):
        check_onnx_file(path)

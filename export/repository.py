"""The Triton model repository on disk: numbered version directories, written atomically, and model configs.

A version is built in ``<model>/.tmp-<random>/`` and renamed to ``<model>/<N>/`` (N = highest version + 1)
only when complete, so Triton never loads a half-written version; a failed build leaves nothing behind.
A version carries its own copy of the runtime code, so that it behaves the same whatever tritonrag is
installed later; ``check_version_dir`` tells whether a version is whole before anything loads it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from . import runtime
from .errors import ExportError
from .runtime.contract import (
    CONFIG_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ONE_ROW_ONNX_FILE,
    ONNX_FILE,
    RUNTIME_DIR,
    TOKENIZER_FILE,
)

# The tracked config templates of this project: model_repository/<task>/config.pbtxt.
TEMPLATES = Path(__file__).resolve().parents[1] / "model_repository"
# The runtime code of the installed package (tritonrag.export.runtime), which an export copies into the version.
RUNTIME_PACKAGE = Path(runtime.__file__).resolve().parent
# Parity metrics, and whether a value must reach the threshold (True) or stay under it (False).
_PARITY_METRICS = {"cosine_min": True, "greedy_identical": True, "max_abs_diff": False}
# The fields of an ONNX ModelProto that every model has: (field number, protobuf wire type) and name.
_ONNX_REQUIRED = {(1, 0): "ir_version", (7, 2): "graph", (8, 2): "opset_import"}


def versions(model_dir: Path) -> list[int]:
    """The version numbers present in ``model_dir``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@contextmanager
def staging_dir(model_dir: Path) -> Iterator[Path]:
    """A fresh ``<model_dir>/.tmp-*`` directory, removed on exit unless ``publish`` renamed it.

    A ``model_dir`` created here is removed again if it ends up empty.
    """
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
    path.chmod(0o755)  # mkdtemp makes it private; Triton may run as another user
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if created:
            with suppress(OSError):  # not empty: a version was published, or another export is staging
                model_dir.rmdir()


def publish(staging: Path, model_dir: Path) -> tuple[int, Path]:
    """Rename ``staging`` to the next version number; retried if a concurrent export takes that number first."""
    while True:
        version = max(versions(model_dir), default=0) + 1
        target = model_dir / str(version)
        try:
            staging.rename(target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return version, target


def write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename, so readers never see it half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def runtime_files(runtime_dir: Path) -> list[Path]:
    """The Python files under ``runtime_dir`` (``__pycache__`` left out), sorted by their relative paths."""
    files = [p for p in runtime_dir.rglob("*.py") if "__pycache__" not in p.relative_to(runtime_dir).parts]
    return sorted(files, key=lambda p: p.relative_to(runtime_dir).as_posix())


def runtime_digest(runtime_dir: Path) -> dict[str, Any]:
    """``{"sha256", "files"}`` of ``runtime_files(runtime_dir)``: SHA-256 over each file's relative path, size
    and bytes, in order; the ``runtime`` entry of ``tritonrag.json``."""
    digest = hashlib.sha256()
    files = runtime_files(runtime_dir)
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(runtime_dir).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return {"sha256": digest.hexdigest(), "files": len(files)}


def write_runtime(version_dir: Path, runtime_module: str, source: Path = RUNTIME_PACKAGE) -> dict[str, Any]:
    """Copy the runtime's Python files from ``source`` into ``<version_dir>/runtime/`` and write the one-line
    ``model.py`` that serves the version with that copy's ``<runtime_module>``; returns the copy's digest.

    Triton's Python backend imports ``model.py`` as the module ``<N>.model`` with the model folder on
    ``sys.path``, so its relative import finds the version's own runtime, never the installed package's.
    """
    target = version_dir / RUNTIME_DIR
    for path in runtime_files(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    if not (target / f"{runtime_module}.py").is_file():
        raise ExportError(f"the runtime at {source} has no {runtime_module}.py")
    line = f"from .{RUNTIME_DIR}.{runtime_module} import TritonPythonModel  # noqa: F401\n"
    (version_dir / MODEL_FILE).write_text(line)
    return runtime_digest(target)


def check_version_dir(version_dir: Path, task: str) -> dict[str, Any]:
    """The metadata of the version in ``version_dir`` once it is whole and fit to serve ``task``, or
    ``ExportError`` naming the file and what is wrong with it.

    Checked without loading anything: ``tritonrag.json`` parses and names ``task``; ``model.onnx``,
    ``tokenizer.json``, ``model.py`` and ``runtime/`` exist; the runtime's files hash to the metadata's
    ``runtime`` entry; ``model.onnx`` (and a generator's one-row graph, where the metadata names one) is a
    whole ONNX model (``check_onnx_file``); every parity report passed.
    """
    metadata_file = version_dir / METADATA_FILE
    try:
        metadata = json.loads(metadata_file.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{metadata_file} cannot be read as JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ExportError(f"{metadata_file} holds {type(metadata).__name__}, not an object")
    if metadata.get("task") != task:
        raise ExportError(f"{metadata_file}: the task is {metadata.get('task')!r}, expected {task!r}")
    one_row = [ONE_ROW_ONNX_FILE] if "one_row_graph" in metadata else []
    for name in (ONNX_FILE, TOKENIZER_FILE, MODEL_FILE, *one_row):
        if not (version_dir / name).is_file():
            raise ExportError(f"{version_dir / name} is missing")
    runtime_dir = version_dir / RUNTIME_DIR
    if not runtime_dir.is_dir():
        raise ExportError(f"{runtime_dir}/ is missing")
    found = runtime_digest(runtime_dir)
    if metadata.get("runtime") != found:
        raise ExportError(
            f"{runtime_dir}/ hashes to {found}, but {metadata_file} records {metadata.get('runtime')}: "
            "the runtime was changed or not wholly copied"
        )
    for name in (ONNX_FILE, *one_row):
        check_onnx_file(version_dir / name)
    quantization = metadata.get("quantization")
    reports = [("float32", metadata.get("parity"), True)]
    if quantization is not None:
        label, report = (
            (str(quantization.get("weights", "quantised")), quantization.get("parity"))
            if isinstance(quantization, dict)
            else ("quantised", None)
        )
        reports.append((label, report, False))
    for label, report, float32 in reports:
        failure = parity_failure(report, float32)
        if failure:
            raise ExportError(f"{metadata_file}: the {label} parity check {failure}")
    return metadata


def parity_failure(report: Any, float32: bool) -> str | None:
    """Why a parity ``report`` of ``tritonrag.json`` fails, or None when it passed or only reports (no threshold).

    As the export judged it: ``value`` against ``threshold``, and for ``float32`` also ``alone_vs_batched``
    and a reranker's ``same_order``.
    """
    if not isinstance(report, dict) or report.get("metric") not in _PARITY_METRICS:
        return f"has no report: {report!r}"
    threshold = report.get("threshold")
    if threshold is None:
        return None
    values = [
        report.get("value"),
        *([report.get("alone_vs_batched")] if float32 and "alone_vs_batched" in report else []),
    ]
    if not all(isinstance(v, int | float) for v in [*values, threshold]):
        return f"has non-numeric values: {report!r}"
    reach = _PARITY_METRICS[report["metric"]]
    if any(v < threshold if reach else v > threshold for v in values):
        return f"failed: {report['metric']} {values} against the threshold {threshold}"
    if float32 and report.get("same_order") is False:
        return "failed: the scores' order differs from PyTorch's"
    return None


def check_onnx_file(path: Path) -> None:
    """Raise ``ExportError`` unless ``path`` holds a whole ONNX model.

    Its top-level protobuf fields must end exactly at the end of the file (a truncated copy does not) and
    include ``ir_version``, ``graph`` and ``opset_import``. Only the field headers are read, seeking past
    their contents, so this costs the same for any model size and needs neither onnx (export-only) nor
    an ONNX Runtime session.
    """
    size = path.stat().st_size
    seen: set[tuple[int, int]] = set()
    with path.open("rb") as stream:
        while stream.tell() < size:
            key = _read_varint(stream, path)
            field, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _read_varint(stream, path)
            elif wire_type == 2:
                stream.seek(_read_varint(stream, path), os.SEEK_CUR)
            elif wire_type in (1, 5):
                stream.seek(8 if wire_type == 1 else 4, os.SEEK_CUR)
            else:
                raise ExportError(f"{path} is not an ONNX model: protobuf field {field} has wire type {wire_type}")
            seen.add((field, wire_type))
        end = stream.tell()
    if end != size:
        raise ExportError(f"{path} is truncated: its last field ends at byte {end}, the file at {size}")
    missing = [name for key, name in _ONNX_REQUIRED.items() if key not in seen]
    if missing:
        raise ExportError(f"{path} is not an ONNX model: it has no {', '.join(missing)}")


def _read_varint(stream: BinaryIO, path: Path) -> int:
    """A protobuf varint at the stream's position."""
    value = 0
    for shift in range(0, 70, 7):
        byte = stream.read(1)
        if not byte:
            raise ExportError(f"{path} is truncated: it ends inside a protobuf field")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise ExportError(f"{path} is not an ONNX model: a protobuf varint runs over 10 bytes")


def ensure_config(model_dir: Path, task: str) -> None:
    """Copy the project's ``config.pbtxt`` template for ``task`` into ``model_dir`` unless it has one."""
    if (model_dir / CONFIG_FILE).exists():
        return
    template = TEMPLATES / task / CONFIG_FILE
    if not template.is_file():
        raise ExportError(f"{model_dir / CONFIG_FILE} is missing and there is no template at {template}")
    write_text(model_dir / CONFIG_FILE, template.read_text())

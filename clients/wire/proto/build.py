"""Generate the Python code of the gRPC API from the ``.proto`` files beside this script.

Writes ``*_pb2.py`` (messages), ``*_pb2_grpc.py`` (stubs and servicers) and their ``.pyi``
typing stubs (mypy-protobuf) next to each ``.proto``; the output is git-ignored and ``make``
regenerates it when a ``.proto`` changes. protoc names imports after the proto package
(``tritonrag.v1``); they are rewritten to where the code is installed
(``tritonrag.clients.wire.proto.tritonrag.v1``). Needs the ``dev`` extra (grpcio-tools, mypy-protobuf).

Usage: ``python clients/wire/proto/build.py``
"""

from __future__ import annotations

import re
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = "tritonrag.clients.wire.proto"
_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    """A protoc plugin installed beside this Python, whether or not its environment is on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install the dev extra (mypy-protobuf)")
    return f"--plugin={name}={found}"


def _rewrite_imports(path: Path, proto_packages: set[str]) -> None:
    """``tritonrag.v1.x_pb2`` -> ``tritonrag.clients.wire.proto.tritonrag.v1.x_pb2`` in imports and annotations."""
    text = path.read_text()
    for package in proto_packages:
        escaped = re.escape(package)
        text = re.sub(rf"(?<![\w.])from {escaped} import ", f"from {PACKAGE}.{package} import ", text)
        text = re.sub(rf"(?<![\w.]){escaped}\.(\w+_pb2)\b", rf"{PACKAGE}.{package}.\1", text)
    path.write_text(text)


def generate() -> list[Path]:
    """Compile every ``.proto`` under this folder; return the files written."""
    protos = sorted(ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{resources.files('grpc_tools') / '_proto'}",  # google/protobuf/*.proto
        *(_plugin(name) for name in _PLUGINS),
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *(str(proto.relative_to(ROOT)) for proto in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, protos))}")
    proto_packages = {".".join(proto.relative_to(ROOT).parent.parts) for proto in protos}
    written = [path for proto in protos for path in sorted(proto.parent.glob(f"{proto.stem}_pb2*.py*"))]
    for path in written:
        _rewrite_imports(path, proto_packages)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))

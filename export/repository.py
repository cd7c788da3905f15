"""The Triton model repository on disk: numbered version directories, written atomically, and model configs.

A version is built in ``<model>/.tmp-<random>/`` and renamed to ``<model>/<N>/`` (N = highest version + 1)
only when complete, so Triton never loads a half-written version; a failed build leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import ExportError
from .runtime.contract import CONFIG_FILE, MODEL_FILE

# The tracked config templates of this project: model_repository/<task>/config.pbtxt.
TEMPLATES = Path(__file__).resolve().parents[1] / "model_repository"


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


def write_model_py(version_dir: Path, runtime_module: str) -> None:
    """The one-line ``model.py`` that serves this version with ``tritonrag.export.runtime.<runtime_module>``."""
    line = f"from tritonrag.export.runtime.{runtime_module} import TritonPythonModel  # noqa: F401\n"
    (version_dir / MODEL_FILE).write_text(line)


def ensure_config(model_dir: Path, task: str) -> None:
    """Copy the project's ``config.pbtxt`` template for ``task`` into ``model_dir`` unless it has one."""
    if (model_dir / CONFIG_FILE).exists():
        return
    template = TEMPLATES / task / CONFIG_FILE
    if not template.is_file():
        raise ExportError(f"{model_dir / CONFIG_FILE} is missing and there is no template at {template}")
    write_text(model_dir / CONFIG_FILE, template.read_text())

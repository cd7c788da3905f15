"""The wheel holds every package, the generated gRPC code, the typing markers and the config.pbtxt templates."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile

import pytest

from tritonrag.server.config import REPO_ROOT

FOLDERS = ("server", "export", "clients", "deploy")  # installed as tritonrag.<folder> (setup.py)
TEMPLATES = sorted(REPO_ROOT.glob("model_repository/*/config.pbtxt"))


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The files of a wheel built from a copy of the sources.

    A copy, because a build in place writes build/lib beside the editable install's link tree in build/ and ships
    whatever an earlier build left there; the copy has the git-ignored generated code and no model versions.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source)
    for folder in FOLDERS:
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for template in TEMPLATES:
        (source / template.relative_to(REPO_ROOT)).parent.mkdir(parents=True)
        shutil.copy2(template, source / template.relative_to(REPO_ROOT))
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_every_package_and_nothing_else(wheel_files: set[str]) -> None:
    on_disk = {
        f"tritonrag/{init.parent.relative_to(REPO_ROOT).as_posix()}"
        for folder in FOLDERS
        for init in (REPO_ROOT / folder).rglob("__init__.py")
    }
    assert {name.removesuffix("/__init__.py") for name in wheel_files if name.endswith("/__init__.py")} == on_disk
    version = importlib.metadata.version("tritonrag")
    assert {name.split("/")[0] for name in wheel_files} == {"tritonrag", f"tritonrag-{version}.dist-info"}


def test_the_wheel_holds_the_generated_code_typing_markers_and_templates(wheel_files: set[str]) -> None:
    grpc_code = "tritonrag/clients/wire/proto/tritonrag/v1/tritonrag_pb2"
    expected = {
        f"{grpc_code}.py",
        f"{grpc_code}.pyi",
        *(f"tritonrag/{folder}/py.typed" for folder in FOLDERS),
        *(f"tritonrag/model_repository/{template.parent.name}/config.pbtxt" for template in TEMPLATES),
    }
    assert len(TEMPLATES) >= 3
    assert sorted(expected - wheel_files) == []

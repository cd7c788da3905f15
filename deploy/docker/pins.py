"""Print requirement lines pinned as pyproject.toml pins them, for the images' ``pip install``.

Usage: ``pins.py PYPROJECT [--extra NAME] PACKAGE[=DISTRIBUTION] ...``; ``onnxruntime=onnxruntime-gpu`` installs
the version pyproject.toml pins for onnxruntime under the other distribution's name. Standard library only: it
runs in the images before anything is installed (Python 3.11 and later, for tomllib).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(pyproject: Path, extra: str | None = None) -> dict[str, str]:
    """Each distribution pinned with ``==`` among the project's dependencies (or an extra's): canonical name to
    version."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = project["optional-dependencies"][extra] if extra else project["dependencies"]
    pins = {}
    for requirement in requirements:
        match = _PIN.match(requirement)
        if match:
            pins[_canonical(match[1])] = match[2]
    return pins


def requirement_lines(pyproject: Path, packages: list[str], extra: str | None = None) -> list[str]:
    """``DISTRIBUTION==VERSION`` for each ``PACKAGE[=DISTRIBUTION]``; SystemExit naming a package not pinned."""
    pins = pinned(pyproject, extra)
    lines = []
    for package in packages:
        name, _, distribution = package.partition("=")
        version = pins.get(_canonical(name))
        if version is None:
            raise SystemExit(f"{pyproject} pins no {name!r} in {extra or 'dependencies'}")
        lines.append(f"{distribution or name}=={version}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Requirement lines pinned as pyproject.toml pins them.")
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", help="an optional-dependencies group instead of the dependencies")
    parser.add_argument("packages", nargs="+", metavar="PACKAGE[=DISTRIBUTION]")
    args = parser.parse_args()
    print("\n".join(requirement_lines(args.pyproject, args.packages, args.extra)))


if __name__ == "__main__":
    main()

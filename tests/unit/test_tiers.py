"""The test tiers: every test lives in a tier's folder, and the unit tier imports no torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import TESTS, TIERS


def test_every_test_file_is_in_a_tier_folder() -> None:
    files = [path.relative_to(TESTS) for pattern in ("test_*.py", "*_test.py") for path in TESTS.rglob(pattern)]
    outside = sorted(str(path) for path in files if path.parts[0] not in TIERS)
    assert outside == [], f"outside the tier folders {TIERS} under tests/, these tests would run unmarked"


def test_tests_are_marked_with_their_folder(request: pytest.FixtureRequest) -> None:
    assert [marker.name for marker in request.node.iter_markers() if marker.name in TIERS] == ["unit"]


def test_the_unit_tier_imports_no_torch_or_transformers() -> None:
    modules = ["tests.conftest", *(f"tests.unit.{path.stem}" for path in sorted((TESTS / "unit").glob("*.py")))]
    check = (
        "import importlib, sys\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        "print(sorted({name.partition('.')[0] for name in sys.modules} & {'torch', 'transformers'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], check=False, cwd=TESTS.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "a unit test module or tests/conftest.py imports torch or transformers"

"""Length-sorted sub-batching and execution-provider choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonrag.export.runtime.inference import execution_providers, sub_batches


def test_sub_batches_sort_by_length_and_respect_both_limits() -> None:
    lengths = [5, 50, 6, 7, 48, 5]
    batches = sub_batches(lengths, max_rows=3, max_tokens=120)
    assert batches == [[0, 5, 2], [3, 4], [1]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) * max(lengths[i] for i in batch) <= 120


def test_a_row_longer_than_the_budget_still_runs_alone() -> None:
    assert sub_batches([500, 3], max_rows=8, max_tokens=100) == [[1], [0]]


def test_sub_batches_of_nothing() -> None:
    assert sub_batches([], max_rows=8, max_tokens=100) == []


@pytest.mark.parametrize("gpu", [False, True])
def test_cpu_provider_always_last(gpu: bool, tmp_path: Path) -> None:
    providers = execution_providers(0, gpu=gpu, cache_dir=tmp_path)
    assert providers[-1] == "CPUExecutionProvider"
    if not gpu:
        assert providers == ["CPUExecutionProvider"]

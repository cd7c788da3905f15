"""Length-sorted sub-batching and execution-provider choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.export.runtime.encoding import Encoding
from tritonrag.export.runtime.inference import CancelledError, SortedBatchRunner, execution_providers, sub_batches


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


class CountingSession:
    """Stands in for an ONNX Runtime session: one output row per input row, and a count of the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, outputs: object, feeds: dict[str, npt.NDArray[np.int64]]) -> list[npt.NDArray[np.float32]]:
        self.calls += 1
        return [np.ones((len(feeds["input_ids"]), 2), dtype=np.float32)]


class PaddingTokenizer:
    def pad(self, encodings: list[Encoding]) -> dict[str, npt.NDArray[np.int64]]:
        return {"input_ids": np.zeros((len(encodings), max(len(e.ids) for e in encodings)), dtype=np.int64)}


def test_the_runner_stops_between_sub_batches_once_cancelled() -> None:
    session = CountingSession()
    runner = SortedBatchRunner(session, PaddingTokenizer(), max_rows=2, max_tokens=100)  # type: ignore[arg-type]
    rows = [Encoding(ids=[1, 2, 3], type_ids=[0, 0, 0]) for _ in range(10)]  # five sub-batches
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(session.calls)
        return session.calls == 2

    with pytest.raises(CancelledError, match="cancelled after 4 of 10 rows"):
        runner.run(rows, cancelled)
    assert session.calls == 2 and asked == [0, 1, 2]
    assert runner.run(rows).shape == (10, 2)  # not cancelled: every row

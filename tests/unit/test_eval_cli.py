"""``tritonrag eval`` over a live HTTP API (the fakes rank a collection's documents in the order they were
written, whatever the query): metrics computed by hand, the searches it sends, and a bad query file."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fakes import FakeSearch, FakeServices
from tests.harness import serving
from tritonrag.clients.wire.schema import CollectionCreate, DocumentIn, GroupBy, UpsertRequest
from tritonrag.deploy import cli
from tritonrag.server.config import ApiSettings

QUERIES = """\
{"query": "first", "relevant": ["a"]}
{"query": "third", "relevant": ["c"]}

{"query": "second or missing", "relevant": ["b", "x"]}
"""


@pytest.fixture
def served(fakes: FakeServices) -> Iterator[str]:
    """Collection "docs" holding a, b, c, d (ranked in that order), served over HTTP."""

    async def fill() -> None:
        await fakes.collections.create_collection(CollectionCreate(name="docs"))
        for pair in ("ab", "cd"):  # two at a time: inline upserts
            documents = [DocumentIn(id=doc_id, text=f"text of {doc_id}") for doc_id in pair]
            await fakes.collections.upsert_documents("docs", UpsertRequest(documents=documents))

    asyncio.run(fill())
    with serving(fakes.http_app(ApiSettings())) as url:
        yield url


def test_eval_prints_the_metrics_of_each_mode(served: str, search: FakeSearch, tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text(QUERIES)
    args = ["eval", "--collection", "docs", "--queries", str(queries), "--url", served, "--mode", "dense"]
    result = CliRunner().invoke(cli.app, [*args, "--mode", "sparse"])
    assert result.exit_code == 0, result.output
    # a at 1; c at 3; b at 2 of the relevant b and x
    ndcg = (1 + 1 / math.log2(4) + (1 / math.log2(3)) / (1 + 1 / math.log2(3))) / 3
    mrr, recall = (1 + 1 / 3 + 1 / 2) / 3, (1 + 1 + 1 / 2) / 3
    for mode in ("dense", "sparse"):
        assert f"| {mode} | 3 | {ndcg:.3f} | {mrr:.3f} | {recall:.3f} |" in result.output
    assert [request.mode for request in search.searches] == ["dense"] * 3 + ["sparse"] * 3
    assert {(r.group_by, r.top_k, r.use_cache, r.rerank) for r in search.searches} == {
        (GroupBy.document, 10, False, False)
    }


def test_a_bad_query_file_names_its_line(tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"query": "fine", "relevant": ["a"]}\n{"query": "no relevant ones", "relevant": []}\n')
    args = ["eval", "--collection", "docs", "--queries", str(queries)]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "queries.jsonl:2: relevant: List should have at least 1 item" in result.output

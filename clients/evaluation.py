"""Retrieval quality of a collection on labelled queries: nDCG@10, MRR@10 and Recall@10 per search mode.

A query set is JSON lines, each ``{"query": "...", "relevant": ["doc-id", ...]}`` (binary relevance).
Every query is searched once per mode through the HTTP API, documents ranked at their best chunk
(``group_by: "document"``, top 10); the means over the queries, with each mode's median latency, are
the result. ``tritonrag eval`` prints them; the benchmarks use the same functions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from tritonrag.clients.http_client import TritonRagClient
from tritonrag.clients.wire.schema import GroupBy, SearchRequest

CUTOFF = 10


class LabelledQuery(BaseModel):
    """One line of a query set."""

    query: str = Field(min_length=1)
    relevant: list[str] = Field(min_length=1)


class QuerySetError(ValueError):
    """A query set that cannot be read; the message names the file and line."""


def read_queries(path: Path) -> list[LabelledQuery]:
    """The labelled queries of a JSON-lines file; `QuerySetError` naming the first bad line."""
    queries = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                queries.append(LabelledQuery.model_validate_json(line))
            except ValidationError as exc:
                problem = exc.errors()[0]
                where = ".".join(str(part) for part in problem["loc"]) or "line"
                raise QuerySetError(f"{path}:{number}: {where}: {problem['msg']}") from None
    if not queries:
        raise QuerySetError(f"{path}: no queries")
    return queries


def ndcg_at(ranking: Sequence[str], relevant: Iterable[str], cutoff: int = CUTOFF) -> float:
    """nDCG@cutoff of a document ranking with binary relevance."""
    wanted = set(relevant)
    gain = sum(1 / math.log2(rank + 2) for rank, doc in enumerate(ranking[:cutoff]) if doc in wanted)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(wanted), cutoff)))
    return gain / ideal if ideal else 0.0


def reciprocal_rank_at(ranking: Sequence[str], relevant: Iterable[str], cutoff: int = CUTOFF) -> float:
    """1 / the rank of the first relevant document within ``cutoff`` (0 when there is none)."""
    wanted = set(relevant)
    return next((1 / (rank + 1) for rank, doc in enumerate(ranking[:cutoff]) if doc in wanted), 0.0)


def recall_at(ranking: Sequence[str], relevant: Iterable[str], cutoff: int = CUTOFF) -> float:
    """The share of the relevant documents within ``cutoff``."""
    wanted = set(relevant)
    return len(wanted & set(ranking[:cutoff])) / len(wanted) if wanted else 0.0


@dataclass(frozen=True)
class ModeResult:
    """The mean metrics of one search configuration over a query set, and its median latency."""

    label: str
    queries: int
    ndcg: float
    mrr: float
    recall: float
    p50_ms: float


def evaluate(
    client: TritonRagClient, search: SearchRequest, queries: Sequence[LabelledQuery], label: str
) -> ModeResult:
    """Search every query as ``search`` asks (its query replaced; documents ranked at their best chunk, top 10,
    never from the cache) and average the metrics of the document rankings."""
    ndcgs, mrrs, recalls, latencies = [], [], [], []
    for labelled in queries:
        request = search.model_copy(
            update={"query": labelled.query, "top_k": CUTOFF, "group_by": GroupBy.document, "use_cache": False}
        )
        started = time.perf_counter()
        ranking = [hit.doc_id for hit in client.search(request).hits]
        latencies.append((time.perf_counter() - started) * 1e3)
        ndcgs.append(ndcg_at(ranking, labelled.relevant))
        mrrs.append(reciprocal_rank_at(ranking, labelled.relevant))
        recalls.append(recall_at(ranking, labelled.relevant))
    return ModeResult(
        label,
        len(queries),
        statistics.fmean(ndcgs),
        statistics.fmean(mrrs),
        statistics.fmean(recalls),
        statistics.median(latencies),
    )


def report(results: Sequence[ModeResult]) -> str:
    """The results as a markdown table."""
    lines = [
        f"| mode | queries | nDCG@{CUTOFF} | MRR@{CUTOFF} | Recall@{CUTOFF} | p50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.label} | {r.queries} | {r.ndcg:.3f} | {r.mrr:.3f} | {r.recall:.3f} | {r.p50_ms:.1f} |" for r in results
    ]
    return "\n".join(lines)

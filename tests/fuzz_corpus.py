"""The bad-input corpus both front-ends are fuzzed with, and the resources the fuzzing finds in place.

One corpus, two front-ends: ``tests/fuzz_hooks.py`` mixes it into what schemathesis generates from the
OpenAPI document, and ``tests/integration/test_fuzz.py`` sends it to every gRPC method.
"""

from __future__ import annotations

from typing import Any

import httpx2

# The admin key the fuzzed orchestrator is started with (TRITONRAG_AUTH__ADMIN_KEY).
ADMIN_KEY = "trk_fuzz-admin-key-0123456789abcdef0123456789"
SEED_COLLECTION = "fuzz"
SEED_DOCUMENTS: list[dict[str, Any]] = [
    {"id": "paris", "text": "Paris is the capital of France.", "metadata": {"year": 2020, "title": "Paris"}},
    {"id": "notes/berlin.txt", "text": "Berlin is the capital of Germany.", "metadata": {"tags": ["city", "de"]}},
    {"id": "ünï cödé 🙂", "text": "Tea is brewed in hot water.", "metadata": {"score": 0.5, "ok": True}},
]
# Over ingest.inline_max_documents' default (64): the upsert runs as a job, whose id the fuzzing reads.
JOB_DOCUMENTS = 65
MODELS = ("embedder", "reranker", "generator")


def deep_filter(depth: int) -> dict[str, Any]:
    """A filter of ``depth`` levels: one condition inside ``depth - 1`` nested ``and``s."""
    node: dict[str, Any] = {"field": "year", "op": "eq", "value": 2020}
    for _ in range(depth - 1):
        node = {"and": [node]}
    return node


# Strings for names, ids, queries, texts and fields. A lone surrogate is no UTF-8: JSON carries it escaped,
# protobuf refuses it (the gRPC test sends its bytes on the wire instead).
BAD_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "/",
    "a/b",
    "..",
    "../fuzz",
    "fuzz/../fuzz",
    "fuzz\x00",
    "\x00",
    "x" * 10_000,
    "a" * 64,  # a collection name at the limit of its pattern
    "a" * 65,
    "\u202efuzz",  # right-to-left override
    "fu\u200bzz",  # zero-width space
    "\ufefffuzz",  # byte-order mark
    "\ufb01",  # a ligature that NFKC changes
    "e\u0301",  # a combining accent
    "🙂" * 100,
    "🙂" * 2_000,  # 24 KiB percent-encoded: over what a gRPC client reads of a status message, if quoted
    "\ud800",
    "\r\n\t\x1b[31m\x7f\x85",
    "%00%2e%2e%2f",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "{{7*7}}${7*7}%s%n",
    "NaN",
)
# Numbers for counts, sizes and sampling parameters; the gRPC test keeps those its fields' types hold.
BAD_INTS: tuple[int, ...] = (-1, 0, 2**31 - 1, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63), 2**64)
BAD_FLOATS: tuple[float, ...] = (float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324)
BAD_FILTERS: tuple[dict[str, Any], ...] = (
    {},
    {"field": "year"},
    {"field": "", "op": "eq", "value": 1},
    {"field": 7, "op": "eq", "value": 1},
    {"field": "x" * 10_000, "op": "eq", "value": 1},
    {"field": "year", "op": "between", "value": 1},
    {"field": "year", "op": "gt", "value": "2020"},
    {"field": "year", "op": "gt", "value": 2**64},
    {"field": "year", "op": "lte", "value": -(2**63) - 1},
    {"field": "year", "op": "gte", "value": float("nan")},
    {"field": "year", "op": "lt", "value": float("inf")},
    {"field": "year", "op": "eq", "value": float("nan")},
    {"field": "year", "op": "eq", "value": None},
    {"field": "year", "op": "eq", "value": {"nested": 1}},
    {"field": "year", "op": "eq", "value": [2020]},
    {"field": "year", "op": "in", "value": "2020"},
    {"field": "year", "op": "in", "value": []},
    {"field": "year", "op": "in", "value": [1, "a", True, 2.5, 2**64]},
    {"field": "year", "op": "in", "value": [[1]]},
    {"field": "year", "op": "in", "value": list(range(100_000))},
    {"field": "year", "op": "eq", "value": 1, "extra": True},
    {"and": []},
    {"and": "year"},
    {"and": [1, "a", None]},
    {"and": [{"field": "year", "op": "eq", "value": 1}], "or": [{"field": "year", "op": "eq", "value": 2}]},
    {"or": [{"field": f"f{i}", "op": "eq", "value": i} for i in range(10_000)]},
    deep_filter(9),
    deep_filter(50),
    deep_filter(300),
)
BAD_METADATA: tuple[dict[str, Any], ...] = (
    {"": 1},
    {"x" * 10_000: 1},
    {"\x00": "\x00"},
    {"n": None},
    {"n": {"a": 1}},
    {"n": [[1]]},
    {"n": [1, "a"]},
    {"n": []},
    {"n": float("nan")},
    {"n": float("inf")},
    {"n": 2**64},
    {"n": -(2**63) - 1},
    {"n": "x" * 100_000},
    {"n": list(range(100_000))},
    {f"k{i}": i for i in range(10_000)},
    {"title": "x" * 10_000},  # the field the chunk header is taken from
    {"title": 7},
)


def seed(http: httpx2.Client) -> str | None:
    """Create the collection ``SEED_COLLECTION`` if missing, put ``SEED_DOCUMENTS`` in it, and start an
    upsert job; the job's id (None if it ran inline). ``http`` carries the base URL and the credentials."""
    created = http.post("/v1/collections", json={"name": SEED_COLLECTION, "index_type": "flat"})
    assert created.status_code in (201, 409), created.text
    upserted = http.post(f"/v1/collections/{SEED_COLLECTION}/documents", json={"documents": SEED_DOCUMENTS})
    assert upserted.status_code == 200, upserted.text
    bulk = [{"id": f"bulk-{i}", "text": f"bulk document {i}"} for i in range(JOB_DOCUMENTS)]
    job = http.post(f"/v1/collections/{SEED_COLLECTION}/documents", json={"documents": bulk})
    assert job.status_code in (200, 202), job.text
    job_id: str | None = job.json()["job_id"]
    return job_id

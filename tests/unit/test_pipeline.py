"""The core's search path with a stand-in Triton pool: stage order, scores and degradation.

Store, indexes and chunker are real; only the pool (the door to Triton) is replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from tritonrag.server.config import IngestSettings
from tritonrag.server.errors import NotFoundError, UnavailableError
from tritonrag.server.pipeline import RagCore
from tritonrag.server.routing.triton_pool import TritonPool
from tritonrag.server.schema import CollectionCreate, DocumentIn, ModelVersion, SearchRequest, UpsertRequest
from tritonrag.server.store.catalog import Catalog

DIMENSION = 16


def vector(text: str) -> npt.NDArray[np.float32]:
    """A deterministic unit vector per word bag: texts sharing words are close."""
    total = np.zeros(DIMENSION, dtype=np.float32)
    for word in text.lower().split():
        seed = int.from_bytes(hashlib.sha256(word.strip(".,?").encode()).digest()[:4], "little")
        total += np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return total / np.linalg.norm(total)


class StandInPool:
    """Embeds by word hashing, reranks by passage length; either can be switched off."""

    def __init__(self) -> None:
        self.embedder_up = True
        self.reranker_up = True

    async def embed(self, texts: Sequence[str], deadline_s: float | None = None) -> npt.NDArray[np.float32]:
        if not self.embedder_up:
            raise UnavailableError("embedder is down")
        return np.stack([vector(t) for t in texts])

    async def rerank(
        self, query: str, passages: Sequence[str], deadline_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        if not self.reranker_up:
            raise UnavailableError("reranker is down")
        return np.array([len(p) for p in passages], dtype=np.float32)

    async def model_version(self, name: str) -> ModelVersion:
        return ModelVersion(name=name, version="1")

    async def ready(self, model: str | None = None) -> bool:
        return True


DOCS = [
    DocumentIn(id="cats", text="Cats purr and sleep all day.", metadata={"kind": "pet"}),
    DocumentIn(
        id="dogs", text="Dogs bark and fetch sticks in the park for a long long time.", metadata={"kind": "pet"}
    ),
    DocumentIn(id="tea", text="Green tea is brewed with water below boiling.", metadata={"kind": "drink"}),
]


@pytest.fixture
def core_and_pool(tmp_path: Path, minilm_dir: Path) -> tuple[RagCore, StandInPool]:
    version_dir = tmp_path / "repository" / "embedder" / "1"
    version_dir.mkdir(parents=True)
    shutil.copy(minilm_dir / "tokenizer.json", version_dir / "tokenizer.json")
    metadata = {
        "task": "embedder",
        "head": "mean_pool",
        "max_sequence_length": 256,
        "pad_token_id": 0,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
    }
    (version_dir / "tritonrag.json").write_text(json.dumps(metadata))
    pool = StandInPool()
    core = RagCore(
        tmp_path / "data",
        tmp_path / "repository",
        Catalog(tmp_path / "data" / "catalog.sqlite"),
        cast(TritonPool, pool),
        IngestSettings(),
    )
    return core, pool


def run_search(
    core: RagCore, pool: StandInPool | None = None, **fields: object
) -> tuple[list[str], list[str], list[dict[str, float]]]:
    """Fill collection "c", then search; with ``pool`` given, its embedder goes down in between."""

    async def scenario() -> tuple[list[str], list[str], list[dict[str, float]]]:
        await core.create_collection(CollectionCreate(name="c"))
        await core.upsert_documents("c", UpsertRequest(documents=DOCS))
        if pool is not None:
            pool.embedder_up = False
        response = await core.search(SearchRequest.model_validate({"collection": "c", **fields}))
        await core.close()
        return [h.doc_id for h in response.hits], response.degraded, [h.scores for h in response.hits]

    return asyncio.run(scenario())


def test_hybrid_fuses_both_rankings(core_and_pool: tuple[RagCore, StandInPool]) -> None:
    ids, degraded, scores = run_search(core_and_pool[0], query="cats purr", mode="hybrid", top_k=3)
    assert ids[0] == "cats" and degraded == []
    assert {"dense", "sparse", "rrf"} <= set(scores[0])


def test_embedder_down_falls_back_to_bm25(core_and_pool: tuple[RagCore, StandInPool]) -> None:
    core, pool = core_and_pool
    ids, degraded, scores = run_search(core, pool, query="green tea", mode="dense", top_k=2)
    assert ids == ["tea"] and degraded == ["embed"]
    assert set(scores[0]) == {"sparse"}


def test_rerank_reorders_and_a_down_reranker_keeps_the_retrieval_order(
    core_and_pool: tuple[RagCore, StandInPool],
) -> None:
    core, _ = core_and_pool
    ids, _, scores = run_search(core, query="pets", mode="dense", top_k=3, rerank=True)
    assert ids == ["dogs", "tea", "cats"]  # the stand-in reranker prefers long passages
    assert [s["rerank"] for s in scores] == sorted((s["rerank"] for s in scores), reverse=True)


def test_a_down_reranker_is_reported(core_and_pool: tuple[RagCore, StandInPool]) -> None:
    core, pool = core_and_pool
    pool.reranker_up = False
    ids, degraded, scores = run_search(core, query="cats purr", mode="sparse", top_k=3, rerank=True)
    assert ids[0] == "cats" and degraded == ["rerank"] and "rerank" not in scores[0]


def test_filters_and_unknown_collections(core_and_pool: tuple[RagCore, StandInPool]) -> None:
    core, _ = core_and_pool
    ids, _, _ = run_search(
        core, query="anything at all", mode="hybrid", top_k=3, filters={"field": "kind", "op": "eq", "value": "drink"}
    )
    assert ids == ["tea"]
    with pytest.raises(NotFoundError):
        asyncio.run(core.search(SearchRequest(collection="absent", query="x")))

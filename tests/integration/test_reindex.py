"""Blue/green re-index with a real tritonserver serving two embedder versions side by side: a collection pinned to
version 1 moves to version 2 (another tiny BERT, wider, other weights) while searches and a write go on.

The probe of consistency: a dense search for the exact text of a stored chunk finds that chunk at cosine 1.0 only
when the query and the index come from the same version (of other widths, a mixed search cannot even run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import tiny_models
from tests.documents import pydoc_documents
from tests.serving import running_triton
from tests.tiny_models import WIDER_EMBEDDER, wider_embedder
from tritonrag.clients.wire.schema import (
    Chunking,
    CollectionCreate,
    DocumentIn,
    JobInfo,
    JobStatus,
    ModelVersion,
    Reindex,
    SearchMode,
    SearchRequest,
    UpsertRequest,
)
from tritonrag.deploy.launcher import TritonServer
from tritonrag.export.exporter import export_model
from tritonrag.server.app import Services, running_services
from tritonrag.server.config import Settings
from tritonrag.server.errors import UnavailableError

CHUNKING = Chunking(chunk_tokens=24, overlap_tokens=4)  # the tiny embedders read 32 tokens
V1 = ModelVersion(name="embedder", version="1")
V2 = ModelVersion(name="embedder", version="2")
V2_WIDTH = WIDER_EMBEDDER


async def probe(services: Services, text: str) -> tuple[int, float]:
    """The top hit of a dense search for ``text``: its chunk id and its score (cosine)."""
    request = SearchRequest(collection="docs", query=" ".join(text.split()), mode=SearchMode.dense, top_k=1)
    [hit] = (await services.search.search(request.model_copy(update={"use_cache": False}))).hits
    return hit.chunk_id, hit.score


async def probe_all(services: Services, probes: dict[int, str]) -> list[str]:
    """Search each probe's text: what was wrong with any (a failure, or a top hit that is not the probe's chunk at
    cosine 1)."""
    wrong = []
    for chunk_id, text in probes.items():
        try:
            found, score = await probe(services, text)
        except Exception as exc:
            wrong.append(f"search for chunk {chunk_id} failed: {exc!r}")
            continue
        if found != chunk_id or score < 0.999:
            wrong.append(f"search for chunk {chunk_id} found chunk {found} at {score:.4f}")
    return wrong


async def searching(services: Services, probes: dict[int, str], stop: asyncio.Event) -> tuple[int, list[str]]:
    """`probe_all` in rounds until ``stop``: how many rounds ran, and what was wrong."""
    rounds, wrong = 0, []
    while not stop.is_set():
        wrong += await probe_all(services, probes)
        rounds += 1
    return rounds, wrong


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The two embedders' Hugging Face folders: version 1 (32 wide), version 2 (48 wide, other weights)."""
    root = tmp_path_factory.mktemp("reindex-sources")
    first = tiny_models.tiny_embedder(root / "v1", pooling="mean")
    return first, wider_embedder(first, root / "v2")


def serve_both_versions(triton: TritonServer, repository: Path, source: Path) -> None:
    """Publish version 2 and serve it beside version 1 (which serves on, without a failed request)."""
    export_model(f"path:{source}", "embedder", repository, max_sequence_length=32)
    client = grpcclient.InferenceServerClient(triton.endpoints.grpc_url)
    config = client.get_model_config("embedder", as_json=True)["config"]
    config["version_policy"] = {"specific": {"versions": [1, 2]}}
    client.load_model("embedder", config=json.dumps(config))
    client.close()


async def width_once_served(services: Services, version: str) -> int:
    """The width of embedder ``version``'s vectors, once the pool sees it served (at its next probe)."""
    while True:
        with contextlib.suppress(UnavailableError):
            return await services.models.embedding_dimension(version)
        await asyncio.sleep(0.2)


async def ingest(services: Services, documents: list[DocumentIn]) -> dict[int, str]:
    """Create the collection "docs" (pinned to version 1, the one served) and ingest ``documents`` as a job;
    returns eight probes: chunk ids and their texts as embedded (after their document's header), each text
    unique."""
    collections = services.collections
    info = await collections.create_collection(CollectionCreate(name="docs", chunking=CHUNKING))
    assert info.embedder == V1
    job_id = (await collections.upsert_documents("docs", UpsertRequest(documents=documents))).job_id
    assert job_id is not None
    assert (await collections.jobs.wait(job_id, poll_s=0.2)).status is JobStatus.succeeded
    chunks = (await collections.get_collection("docs")).chunks
    ids, texts = (await services.registry.get("docs")).texts(np.arange(1, chunks + 1))
    counts = Counter(" ".join(text.split()) for text in texts)  # pydoc repeats some passages word for word
    unique = [(i, text) for i, text in zip(ids.tolist(), texts, strict=True) if counts[" ".join(text.split())] == 1]
    return dict(unique[n] for n in np.random.default_rng(7).choice(len(unique), size=8, replace=False))


@dataclass
class Reindexed:
    """The re-index job as it ended, the chunks written during it, the rounds of probes and what was wrong."""

    job: JobInfo
    late_chunks: int
    rounds: int
    wrong: list[str]


async def reindex_while_searching(services: Services, probes: dict[int, str], late: DocumentIn) -> Reindexed:
    """Re-index "docs" to version 2 while the probes are searched in rounds, writing ``late`` once the job has
    begun."""
    collections = services.collections
    stop = asyncio.Event()
    searches = asyncio.create_task(searching(services, probes, stop))
    job = await collections.reindex("docs", "2")
    assert (await collections.reindex("docs", "2")).id == job.id  # one job per collection and target
    assert [other.id for other in await collections.reindex_all("2")] == [job.id]
    running = await collections.get_collection("docs")
    assert running.embedder == V1 and running.reindex == Reindex(embedder=V2, job_id=job.id)
    assert await collections.embedder_versions_in_use() == {"1", "2"}
    while (await collections.get_job(job.id)).done == 0:
        await asyncio.sleep(0.05)
    written = await collections.upsert_documents("docs", UpsertRequest(documents=[late]))
    assert written.job_id is None  # inline, embedded by version 1: the collection is pinned to it until the switch
    done = await collections.jobs.wait(job.id, poll_s=0.1)
    await asyncio.sleep(0.5)  # a few rounds after the switch
    stop.set()
    rounds, wrong = await searches
    return Reindexed(done, written.chunks, rounds, wrong)


async def reindex_then_delete(services: Services, documents: list[DocumentIn]) -> JobInfo:
    """Create "gone" (pinned to version 2, the newest served), ingest ``documents``, start re-indexing it to
    version 1 and delete it once the job has begun; returns the job as it ended."""
    collections = services.collections
    assert (await collections.create_collection(CollectionCreate(name="gone", chunking=CHUNKING))).embedder == V2
    job_id = (await collections.upsert_documents("gone", UpsertRequest(documents=documents))).job_id
    assert job_id is not None and (await collections.jobs.wait(job_id, poll_s=0.2)).status is JobStatus.succeeded
    job = await collections.reindex("gone", "1")
    while (await collections.get_job(job.id)).done == 0:
        await asyncio.sleep(0.02)
    await collections.delete_collection("gone")
    return await collections.jobs.wait(job.id, poll_s=0.1)


def test_a_collection_reindexed_to_another_embedder_version_serves_one_version_throughout(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    export_model(f"path:{sources[0]}", "embedder", repository, max_sequence_length=32)
    documents = pydoc_documents()
    assert len(documents) >= 300
    late = DocumentIn(id="late", text="Written during the re-index. " + documents[0].text[:600])

    async def scenario(triton: TritonServer) -> None:
        settings = Settings(
            data_dir=tmp_path / "data",
            triton={"repository": repository, "grpc_port": triton.endpoints.grpc_port},
            routing={"probe_interval_s": 0.2, "breaker_cooldown_s": 0.5, "backoff_max_s": 0.2},
            ingest={"backoff_base_s": 0.05, "backoff_max_s": 0.5},
            rollout={"enabled": False},  # versions are loaded here, by hand
        )
        async with running_services(settings) as services:
            probes = await ingest(services, documents)
            chunks = (await services.collections.get_collection("docs")).chunks
            assert await probe_all(services, probes) == []
            await asyncio.to_thread(serve_both_versions, triton, repository, sources[1])
            assert await width_once_served(services, "2") == V2_WIDTH
            reindexed = await reindex_while_searching(services, probes, late)
            assert reindexed.wrong == [] and reindexed.rounds > 1
            job, info = reindexed.job, await services.collections.get_collection("docs")
            assert (job.status, job.done, job.failed) == (JobStatus.succeeded, job.total, 0)
            assert job.total == info.chunks == chunks + reindexed.late_chunks
            assert info.embedder == V2 and info.reindex is None
            assert await services.collections.embedder_versions_in_use() == {"2"}
            collection = await services.registry.get("docs")
            late_ids, late_texts = collection.texts(np.arange(chunks + 1, info.chunks + 1))
            assert {chunk.doc_id for chunk in collection.chunks(late_ids.tolist())} == {"late"}
            for chunk_id, text in zip(late_ids.tolist(), late_texts, strict=True):
                assert collection.chunks([chunk_id])[0].vector.shape == (V2_WIDTH,)
                found, score = await probe(services, text)
                assert found == chunk_id and score >= 0.999
            ended = await reindex_then_delete(services, documents[:150])  # a deleted collection ends its re-index
            assert ended.status is JobStatus.failed and ended.done + ended.failed == ended.total
            assert [error.error for error in ended.errors] in (
                ["collection 'gone' does not exist"],
                ["collection 'gone' was deleted during its re-index"],
            )
            assert await services.collections.embedder_versions_in_use() == {"2"}

    with running_triton(repository, ["embedder"], tmp_path / "triton") as triton:
        asyncio.run(scenario(triton))

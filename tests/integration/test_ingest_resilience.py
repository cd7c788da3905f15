"""Ingestion through Triton trouble, with the tiny models in a real Triton: a restart in the middle of a job
pauses it, and it then completes with exactly the right chunks."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from pathlib import Path

from tritonrag.clients.wire.schema import Chunking, CollectionCreate, DocumentIn, JobStatus, UpsertRequest
from tritonrag.deploy.launcher import TritonEndpoints, TritonServer
from tritonrag.server.app import running_services
from tritonrag.server.config import Settings
from tritonrag.server.ingest.chunking import Chunker

CHUNKING = Chunking(chunk_tokens=24, overlap_tokens=4)  # the tiny embedder reads 32 tokens


def stdlib_docs() -> list[DocumentIn]:
    """The docstrings of standard-library modules and their public functions: real text of every length."""
    docs: dict[str, DocumentIn] = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"this", "antigravity"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # some modules refuse to import on this platform
            continue
        for doc_id, value in [
            (name, module),
            *((f"{name}.{n}", f) for n, f in inspect.getmembers(module, inspect.isfunction)),
        ]:
            text = inspect.getdoc(value)
            if text and text.strip():
                docs[doc_id] = DocumentIn(id=doc_id, text=text)
    return list(docs.values())


def test_a_triton_restart_mid_ingest_pauses_the_job_and_it_completes_exactly(
    tiny_repository: Path, tmp_path: Path
) -> None:
    docs = stdlib_docs()[:3000]
    chunker = Chunker.from_version_dir(
        tiny_repository / "embedder" / "1", CHUNKING.chunk_tokens, CHUNKING.overlap_tokens
    )
    expected_chunks = sum(len(chunker.chunk_document(doc, CHUNKING.header).spans) for doc in docs)
    endpoints = TritonEndpoints.on_free_ports()
    triton = TritonServer(tiny_repository, endpoints, ["embedder"], tmp_path / "work")
    settings = Settings(
        data_dir=tmp_path / "data",
        triton={"repository": tiny_repository, "grpc_port": endpoints.grpc_port},
        routing={"probe_interval_s": 0.2, "breaker_cooldown_s": 0.5, "backoff_max_s": 0.2},
        ingest={"batch_documents": 8, "backoff_base_s": 0.05, "backoff_max_s": 0.5},
    )

    async def scenario() -> tuple[int, int, tuple[JobStatus, int, int], int]:
        async with running_services(settings) as services:
            await services.collections.create_collection(CollectionCreate(name="docs", chunking=CHUNKING))
            job_id = (await services.collections.upsert_documents("docs", UpsertRequest(documents=docs))).job_id
            assert job_id is not None
            while (await services.collections.get_job(job_id)).done == 0:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(triton.stop)
            done_when_stopped = (await services.collections.get_job(job_id)).done
            await asyncio.sleep(1.0)  # the job finds Triton gone and pauses
            paused_at = (await services.collections.get_job(job_id)).done
            await asyncio.to_thread(triton.start, 300)
            job = await services.collections.jobs.wait(job_id, poll_s=0.2)
            info = await services.collections.get_collection("docs")
            return done_when_stopped, paused_at, (job.status, job.done, job.failed), info.chunks

    triton.start(timeout_s=300)
    try:
        stopped_at, paused_at, outcome, chunks = asyncio.run(scenario())
    finally:
        triton.stop()
    assert 0 < stopped_at <= paused_at < len(docs)  # the job was mid-way, and waited
    assert outcome == (JobStatus.succeeded, len(docs), 0)  # every document, none failed
    assert chunks == expected_chunks

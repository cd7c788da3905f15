"""Ingestion at real scale with the bundled MiniLM embedder in real Triton: long real documents (pydoc
renders of the standard library, from one chunk to two thousand) land whole, with default settings,
while searches run beside them without an error and without a breaker opening."""

from __future__ import annotations

import asyncio
import pydoc
import sys
import time
from pathlib import Path

import pytest

from tritonrag.clients.wire.schema import Chunking, CollectionCreate, DocumentIn, SearchRequest, UpsertRequest
from tritonrag.deploy.launcher import TritonServer
from tritonrag.server.app import running_services
from tritonrag.server.config import Settings
from tritonrag.server.ingest.chunking import Chunker

# Modules whose pydoc render is long (hundreds of KB for some); "this" and "antigravity" act on import.
MODULES = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in {"this", "antigravity"})
HUGE_CHUNKS = 2000
# Closes the longest document; no module doc holds these words, so only its last chunk can match them.
CODA = "Coda: the quetzal lighthouse keeper tallies zeppelins over Reykjavik."


def render(name: str) -> str | None:
    """The plain-text pydoc of a standard-library module, or None when it does not import here."""
    try:
        return pydoc.render_doc(name, renderer=pydoc.plaintext)  # type: ignore[attr-defined]  # not in typeshed
    except Exception:  # some modules refuse to import on this platform
        return None


@pytest.fixture(scope="module")
def documents(bundled_repository: Path) -> tuple[list[DocumentIn], dict[str, int]]:
    """One-chunk documents, module docs of every size, and one document of ~2,000 chunks; with each one's
    chunk count under the default chunking (headers included)."""
    chunker = Chunker.from_version_dir(bundled_repository / "embedder" / "1", 200, 40)
    renders = [(name, text) for name in MODULES[:400] if (text := render(name))]
    docs = [DocumentIn(id="one-line", text="Owls hunt at night; the ☕ keeps the librarian awake.")]
    docs += [DocumentIn(id=name, text=text, metadata={"kind": "module"}) for name, text in renders[:120]]
    huge, parts = "", iter(text for _, text in renders)
    while len(chunker.chunk(huge)) < HUGE_CHUNKS:
        huge += next(parts) + "\n\n" + next(parts) + "\n\n"
    docs.append(DocumentIn(id="huge", text=huge + CODA, metadata={"kind": "concatenation"}))
    header = Chunking().header  # the collection's: each document's first line (no title)
    return docs, {doc.id: len(chunker.chunk_document(doc, header).spans) for doc in docs}


def test_long_documents_land_whole_while_searches_keep_working(
    bundled_server: TritonServer,
    bundled_repository: Path,
    documents: tuple[list[DocumentIn], dict[str, int]],
    tmp_path: Path,
) -> None:
    docs, chunk_counts = documents
    assert min(chunk_counts.values()) == 1 and max(chunk_counts.values()) >= HUGE_CHUNKS
    settings = Settings(
        data_dir=tmp_path / "data",
        triton={"repository": bundled_repository, "grpc_port": bundled_server.endpoints.grpc_port},
    )
    queries = ["parse command line options", "compress data with zlib", "the owl hunts at night"]

    async def scenario() -> None:
        async with running_services(settings) as services:
            await services.collections.create_collection(CollectionCreate(name="stdlib"))
            searching, errors, degraded, latencies = True, [], [], []

            async def search_beside() -> None:
                while searching:
                    for query in queries:
                        started = time.perf_counter()
                        try:
                            found = await services.search.search(SearchRequest(collection="stdlib", query=query))
                            degraded.extend(found.degraded)
                        except Exception as exc:  # every failure of a search is what this test counts
                            errors.append(repr(exc))
                        latencies.append(time.perf_counter() - started)
                        await asyncio.sleep(0.25)

            searches = asyncio.create_task(search_beside())
            result = await services.collections.upsert_documents("stdlib", UpsertRequest(documents=docs))
            assert result.job_id is not None  # far more than a request can embed in its deadline
            job = await services.collections.jobs.wait(result.job_id, poll_s=0.5)
            searching = False
            await searches
            info = await services.collections.get_collection("stdlib")
            found = await services.search.search(SearchRequest(collection="stdlib", query=CODA, mode="sparse", top_k=3))
            endpoints = services.health.endpoints()

        assert (job.done, job.failed, job.errors) == (len(docs), 0, [])
        assert info.documents == len(docs) and info.chunks == sum(chunk_counts.values())
        assert found.hits[0].doc_id == "huge" and CODA in found.hits[0].text  # its last chunk landed
        assert errors == [] and degraded == [] and len(latencies) >= 3
        assert [e.breaker_openings for e in endpoints] == [0]

    asyncio.run(scenario())

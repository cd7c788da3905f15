"""The ingest loop of ``tritonrag ingest`` with a stand-in API client: batching, resume, bad documents."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from tritonrag.clients.extract import Extraction
from tritonrag.clients.http_client import ApiError, TritonRagClient
from tritonrag.clients.ingest import IngestState, ingest
from tritonrag.clients.progress import Progress
from tritonrag.clients.wire.schema import DocumentIn, UpsertResult


class StandInClient:
    """Accepts documents unless their text contains "bad"; records what was sent."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def upsert(self, collection: str, documents: list[DocumentIn]) -> UpsertResult:
        self.calls.append([d.id for d in documents])
        if any("bad" in d.text for d in documents):
            raise ApiError(422, "INVALID_ARGUMENT", "bad text")
        return UpsertResult(collection=collection, documents=len(documents), chunks=2 * len(documents))


def run(client: StandInClient, documents: list[DocumentIn], state_file: Path, batch: int) -> tuple[Progress, list[str]]:
    errors: list[str] = []
    progress = ingest(
        cast(TritonRagClient, client),
        "c",
        Extraction(documents=documents),
        IngestState(state_file),
        batch,
        lambda _progress, new: errors.extend(new),
    )
    return progress, errors


def docs(*texts: str) -> list[DocumentIn]:
    return [DocumentIn(id=f"d{i}", text=t) for i, t in enumerate(texts)]


def test_a_bad_document_fails_alone_even_in_a_batch_of_one(tmp_path: Path) -> None:
    client = StandInClient()
    progress, errors = run(client, docs("fine", "bad one", "fine too", "bad two", "fine again"), tmp_path / "s", 2)
    assert (progress.done, progress.failed, progress.chunks) == (3, 2, 6)
    assert errors == ["d1: bad text", "d3: bad text"]
    assert client.calls == [["d0", "d1"], ["d0"], ["d1"], ["d2", "d3"], ["d2"], ["d3"], ["d4"]]


def test_a_rerun_sends_only_what_is_new_or_changed(tmp_path: Path) -> None:
    run(StandInClient(), docs("one", "two", "three"), tmp_path / "s", 2)
    client = StandInClient()
    progress, _ = run(client, docs("one", "two changed", "three"), tmp_path / "s", 2)
    assert client.calls == [["d1"]] and progress.total == 1

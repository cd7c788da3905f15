"""``tritonrag ingest``: files → documents → the orchestrator, in batches, resumable.

Each batch that the API acknowledges is recorded in a state file (by document id and a hash
of its content), written atomically; a rerun of the same command skips what was recorded, so
an interrupted ingest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tritonrag.clients.extract import Extraction
from tritonrag.clients.progress import Progress
from tritonrag.clients.wire.schema import DocumentIn

from .http_client import ApiError, TritonRagClient


def content_hash(document: DocumentIn) -> str:
    """A digest of what an upsert of ``document`` writes."""
    payload = json.dumps([document.text, document.metadata], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


class IngestState:
    """Documents already acknowledged for one collection, persisted in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def pending(self, documents: Sequence[DocumentIn]) -> list[DocumentIn]:
        """The documents not yet acknowledged with their current content."""
        return [d for d in documents if self.done.get(d.id) != content_hash(d)]

    def record(self, documents: Sequence[DocumentIn]) -> None:
        """Mark ``documents`` acknowledged; the file is replaced atomically."""
        self.done.update({d.id: content_hash(d) for d in documents})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as file:
            json.dump(self.done, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)


def ingest(
    client: TritonRagClient,
    collection: str,
    extraction: Extraction,
    state: IngestState,
    batch_documents: int,
    report: Callable[[Progress, list[str]], None],
) -> Progress:
    """Upsert the pending documents of ``extraction`` in batches, recording each acknowledged batch.

    A batch the API refuses as bad input is retried document by document, so one bad document
    fails alone; ``report`` gets the progress and the new error messages after each batch.
    """
    pending = state.pending(extraction.documents)
    progress = Progress(len(pending))
    for start in range(0, len(pending), batch_documents):
        errors: list[str] = []
        _settle(client, collection, pending[start : start + batch_documents], state, progress, errors)
        report(progress, errors)
    return progress


def _settle(
    client: TritonRagClient,
    collection: str,
    documents: list[DocumentIn],
    state: IngestState,
    progress: Progress,
    errors: list[str],
) -> None:
    """Upsert ``documents``; when the API refuses them as bad input, retry one by one, so a bad one fails alone."""
    try:
        chunks = _upsert(client, collection, documents)
    except ApiError as exc:
        if exc.status == 404 or exc.status >= 500:
            raise
        if len(documents) == 1:
            progress.advance(0, failed=1)
            errors.append(f"{documents[0].id}: {exc.message}")
            return
        for document in documents:
            _settle(client, collection, [document], state, progress, errors)
        return
    state.record(documents)
    progress.advance(len(documents), chunks=chunks)


def _upsert(client: TritonRagClient, collection: str, documents: list[DocumentIn]) -> int:
    """Chunks written; when the API runs the upsert as a job, wait for it."""
    result = client.upsert(collection, documents)
    if result.job_id is None:
        return result.chunks
    job = client.wait_for_job(result.job_id)
    if job.failed:
        raise ApiError(422, "INVALID_ARGUMENT", "; ".join(f"{e.doc_id}: {e.error}" for e in job.errors))
    return 0

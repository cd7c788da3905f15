"""What one request did, gathered while it runs: route, status, stage timings, degraded stages, generations.

A front-end opens a ``RequestRecord`` per request (``recording``); the code below it finds that record
with ``current()``: the ``Timer`` adds its stages and degraded stages, the Triton pool its generations.
Outside a request (an ingestion job, a benchmark calling a service) there is none, and nothing is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from tritonrag.clients.wire.schema import GenerationDelta

UNMATCHED = "unmatched"  # the route of a request that matched none (the raw path is never a label)
GONE = "499"  # the status of an HTTP request whose client left before an answer was started


@dataclass
class GenerationRecord:
    """One generation's time to its first delta, the gaps between deltas, and its token counts."""

    model: str
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _last: float | None = None

    def delta(self, delta: GenerationDelta) -> GenerationDelta:
        """Note the arrival of ``delta`` (the token counts of the last one) and return it."""
        now = time.perf_counter()
        if self._last is None:
            self.first_token_s = now - self.started
        else:
            self.inter_token_s.append(now - self._last)
        self._last = now
        if delta.finish_reason is not None:
            self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
        return delta


@dataclass
class RequestRecord:
    """One request to either front-end: its labels (``protocol``, ``route`` template, ``method``, ``status``:
    an HTTP status or a gRPC code name), its duration, and what the services below it reported."""

    protocol: str
    method: str
    request_id: str | None = None
    route: str = UNMATCHED
    status: str = GONE
    started: float = field(default_factory=time.perf_counter)
    duration_s: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    cache: str | None = None  # the cache level that served the request: "l1", "l2", "miss"
    caller: str | None = None  # "<tenant>/<subject>" of an authenticated request
    generations: list[GenerationRecord] = field(default_factory=list)

    def stage(self, name: str, ms: float) -> None:
        """Add ``ms`` to stage ``name``."""
        self.stages_ms[name] = self.stages_ms.get(name, 0.0) + ms

    def report_cache(self, level: str) -> None:
        """The cache level that served the request."""
        self.cache = level


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("tritonrag_request_record", default=None)


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """``record`` as the current request's for the block (its task and the tasks it starts); its
    ``duration_s`` is set when the block ends."""
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        record.duration_s = time.perf_counter() - record.started
        _CURRENT.reset(token)


def current() -> RequestRecord | None:
    """The record of the request being served, if any."""
    return _CURRENT.get()


def generation(model: str) -> GenerationRecord:
    """A record of a generation of ``model`` starting now, kept by the current request's record if any."""
    record = GenerationRecord(model)
    request = _CURRENT.get()
    if request is not None:
        request.generations.append(record)
    return record

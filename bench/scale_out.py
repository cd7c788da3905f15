"""Beyond one machine, measured on one: staleness between replicas, jobs on a Celery worker, search through a balancer.

Everything runs for real on loopback: PostgreSQL (``tests.serving.PostgresServer``), Redis, one Triton serving the
bundled MiniLM as the embedder, ``tritonrag serve`` replicas over the shared store, ``tritonrag worker``, and
Debian's nginx as the load balancer (that part is skipped, saying so, where nginx is not installed).

1. Staleness: a one-document upsert through replica A, then replica B's ``GET /v1/collections/<name>`` every
   ~2 ms until B's revision reaches the one A's write returned: the time from A's answer to B's index holding the
   write (a notification wakes B's follower; ``store.follow_interval_s`` bounds it when notifications are lost).
2. Ingest: the same pydoc documents as one job, run by the orchestrator's embedded runner over SQLite files (the
   default), by the embedded runner over PostgreSQL, and by one Celery worker over PostgreSQL: chunks/s from the
   upsert to the job's end.
3. Search through nginx with one, then two replicas: hybrid searches (pydoc summaries, no cache) from closed-loop
   clients; queries/s and client-side p50/p95.

``python bench/scale_out.py [--documents 150] [--queries 300] [--concurrency 4] [--writes 50]``; markdown on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx2
from corpus import pydoc_documents
from embed import percentiles
from stack import closed_loop, machine, markdown_table, model_repository, progress

from tests.serving import (
    ADMIN_HEADERS,
    Orchestrator,
    PostgresServer,
    RedisServer,
    orchestrator_env,
    start_orchestrator,
    stop_orchestrator,
    wait_until,
)
from tritonrag.deploy.launcher import TritonEndpoints, TritonServer, free_port

MODELS = ["embedder"]
COLLECTION = "scale"


class Bench:
    """Triton, PostgreSQL and Redis for the whole run, and the orchestrators and workers each part starts."""

    def __init__(self, work: Path, repository: Path, stack: ExitStack) -> None:
        self.work = work
        self.repository = repository
        self._stack = stack
        triton_log = stack.enter_context((work / "triton.log").open("w"))
        self.triton = stack.enter_context(
            TritonServer(repository, TritonEndpoints.on_free_ports(), MODELS, work / "triton", log_stream=triton_log)
        )
        for name in ("postgres", "redis"):
            (work / name).mkdir()
        self.postgres = stack.enter_context(PostgresServer(work / "postgres"))
        self.redis = stack.enter_context(RedisServer(work / "redis"))
        self._count = 0

    def env(self, store_url: str | None, **extra: str) -> dict[str, str]:
        """An orchestrator's or worker's environment, with its own data directory; ``store_url``: None for files."""
        self._count += 1
        settings = {"TRITONRAG_RATE_LIMITS__ENABLED": "false", "TRITONRAG_ROLLOUT__ENABLED": "false", **extra}
        if store_url is not None:
            settings["TRITONRAG_STORE__URL"] = store_url
        return orchestrator_env(self.triton, self.repository, self.work / f"data-{self._count}", **settings)

    @contextmanager
    def orchestrators(self, envs: Sequence[dict[str, str]]) -> Iterator[list[Orchestrator]]:
        started: list[Orchestrator] = []
        try:
            for env in envs:
                with (self.work / f"orchestrator-{self._count}.log").open("ab") as log:
                    started.append(start_orchestrator(env, timeout_s=300, log=log))
            yield started
        finally:
            for orchestrator in started:
                stop_orchestrator(orchestrator)

    @contextmanager
    def worker(self, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
        log = self.work / f"worker-{self._count}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tritonrag.deploy.cli", "worker"], env=env, stdout=out, stderr=out
            )
        try:
            wait_until(lambda: b"ready" in log.read_bytes(), f"the worker (see {log})", process, 300)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=60)

    def database(self, name: str) -> str:
        return self.postgres.create_database(name)


def client(orchestrator: Orchestrator) -> httpx2.Client:
    return httpx2.Client(base_url=orchestrator.http_url, timeout=120, headers=ADMIN_HEADERS)


def info(http: httpx2.Client) -> dict[str, Any]:
    """The collection's ``CollectionInfo``."""
    response = http.get(f"/v1/collections/{COLLECTION}")
    if response.status_code != 200:
        raise RuntimeError(f"collection info: {response.status_code} {response.text}")
    answer: dict[str, Any] = response.json()
    return answer


def upsert_and_wait(http: httpx2.Client, documents: list[dict[str, str]]) -> None:
    """Upsert ``documents``; when that makes a job, wait for it, which must succeed with no failures."""
    answer = http.post(f"/v1/collections/{COLLECTION}/documents", json={"documents": documents}).json()
    if answer.get("job_id") is None:
        return
    while (job := http.get(f"/v1/jobs/{answer['job_id']}").json())["status"] in ("queued", "running"):
        time.sleep(0.2)
    if job["status"] != "succeeded" or job["failed"]:
        raise RuntimeError(f"the job ended {job}")


def create(http: httpx2.Client) -> None:
    response = http.post("/v1/collections", json={"name": COLLECTION})
    if response.status_code != 201:
        raise RuntimeError(f"creating the collection: {response.status_code} {response.text}")


# 1. Staleness


def staleness(bench: Bench, writes: int) -> list[float]:
    """Milliseconds from each write's answer on replica A to replica B's revision reaching it."""
    url = bench.database("staleness")
    delays: list[float] = []
    with (
        bench.orchestrators([bench.env(url), bench.env(url)]) as (first, second),
        client(first) as a,
        client(second) as b,
    ):
        create(a)
        for n in range(writes):
            document = {"id": f"note-{n}", "text": f"A short note, number {n}, written through replica A."}
            answer = a.post(f"/v1/collections/{COLLECTION}/documents", json={"documents": [document]})
            acknowledged = time.perf_counter()
            revision = answer.json()["revision"]
            while info(b)["revision"] < revision:
                time.sleep(0.002)
            delays.append((time.perf_counter() - acknowledged) * 1e3)
            time.sleep(0.05)
    return delays


# 2. Ingest


def ingest(bench: Bench, documents: list[dict[str, str]], runner: str) -> tuple[float, int, float]:
    """(chunks/s, chunks, seconds) of one job of ``documents`` run by ``runner``."""
    files = runner == "embedded, SQLite files"
    url = None if files else bench.database(f"ingest_{runner.split(',', maxsplit=1)[0].replace(' ', '_')}")
    jobs = {"TRITONRAG_INGEST__INLINE_MAX_DOCUMENTS": "1"}
    celery = runner.startswith("Celery")
    if celery:
        jobs["TRITONRAG_INGEST__BROKER_URL"] = bench.redis.url
    with ExitStack() as stack:
        (orchestrator,) = stack.enter_context(bench.orchestrators([bench.env(url, **jobs)]))
        if celery:
            stack.enter_context(bench.worker(bench.env(url, **jobs)))
        http = stack.enter_context(client(orchestrator))
        create(http)
        started = time.perf_counter()
        upsert_and_wait(http, documents)
        seconds = time.perf_counter() - started
        chunks = int(info(http)["chunks"])
    return chunks / seconds, chunks, seconds


# 3. Search through nginx


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    upstream tritonrag {{ least_conn; {servers} keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://tritonrag;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextmanager
def nginx(work: Path, backends: Sequence[Orchestrator]) -> Iterator[str]:
    """nginx balancing ``backends`` (least connections, keep-alive); yields its URL."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = " ".join(f"server {o.http_url.removeprefix('http://')};" for o in backends)
    config = work / "nginx.conf"
    config.write_text(NGINX_CONF.format(work=work, servers=servers, port=port))
    nginx_binary = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen([nginx_binary, "-c", str(config), "-p", str(work), "-g", "daemon off;"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), "nginx", process, 30)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx2.TransportError:
        return False


def search_through(url: str, queries: list[str], concurrency: int) -> tuple[float, float, float]:
    """(queries/s, p50 ms, p95 ms) of hybrid searches through ``url``."""

    async def run() -> tuple[float, float, float]:
        async with httpx2.AsyncClient(base_url=url, timeout=120, headers=ADMIN_HEADERS) as http:

            async def search(query: str) -> None:
                body = {"collection": COLLECTION, "query": query, "use_cache": False}
                response = await http.post("/v1/search", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"search: {response.status_code} {response.text}")

            await closed_loop(queries[: 4 * concurrency], concurrency, search)  # warm-up
            measured = await closed_loop(queries, concurrency, search)
        p50, p95 = percentiles(measured.latencies_ms, (50, 95))
        return len(queries) / measured.seconds, p50, p95

    return asyncio.run(run())


def balanced(bench: Bench, documents: list[dict[str, str]], queries: list[str], concurrency: int) -> list[list[str]]:
    url = bench.database("balanced")
    rows = []
    with bench.orchestrators([bench.env(url), bench.env(url)]) as replicas, client(replicas[0]) as http:
        create(http)
        upsert_and_wait(http, documents)
        chunks = info(http)["chunks"]
        wait_until(
            lambda: info(client(replicas[1]))["chunks"] == chunks,
            "replica 2 to follow",
            None,
            120,
        )
        for count in (1, 2):
            with nginx(bench.work / f"nginx-{count}", replicas[:count]) as url_:
                qps, p50, p95 = search_through(url_, queries, concurrency)
            rows.append([f"{count}", f"{chunks}", f"{qps:.1f}", f"{p50:.1f}", f"{p95:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=150, help="pydoc documents ingested (parts 2 and 3)")
    parser.add_argument("--queries", type=int, default=300, help="searches per balancer configuration")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--writes", type=int, default=50, help="writes timed for staleness")
    parser.add_argument("--repository", type=Path, help="a model repository with the embedder (default: cached)")
    args = parser.parse_args()

    repository = model_repository(args.repository, ["embedder"])
    corpus = sorted(pydoc_documents(), key=lambda document: document.id)
    step = max(1, len(corpus) // args.documents)
    picked = corpus[::step][: args.documents]
    documents = [{"id": d.id, "text": d.text} for d in picked]
    queries = [d.summary for d in corpus if d.summary][: args.queries]
    megabytes = sum(len(d["text"]) for d in documents) / 1e6
    header = f"Machine: {machine()}. Documents: {len(documents)} pydoc pages, {megabytes:.1f} MB."
    with tempfile.TemporaryDirectory(prefix="scale-out-") as temporary, ExitStack() as stack:
        bench = Bench(Path(temporary), repository, stack)
        progress("1. staleness between two replicas")
        delays = staleness(bench, args.writes)
        progress("2. ingest: embedded runner (SQLite, PostgreSQL) and one Celery worker")
        ingest_rows = []
        for runner in ("embedded, SQLite files", "embedded, PostgreSQL", "Celery worker, PostgreSQL"):
            rate, chunks, seconds = ingest(bench, documents, runner)
            ingest_rows.append([runner, f"{chunks}", f"{seconds:.1f}", f"{rate:.1f}"])
            progress(f"   {runner}: {rate:.1f} chunks/s")
        progress("3. search through nginx with 1 and 2 replicas")
        search_rows = (
            balanced(bench, documents, queries, args.concurrency)
            if shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
            else []
        )

    p50, p95 = percentiles(delays, (50, 95))
    print(header + "\n")
    print(f"Staleness, write on replica A → visible on replica B ({len(delays)} writes):\n")
    print(
        markdown_table(
            ["", "ms"],
            [
                ["p50", f"{p50:.1f}"],
                ["p95", f"{p95:.1f}"],
                ["max", f"{max(delays):.1f}"],
                ["mean", f"{statistics.fmean(delays):.1f}"],
            ],
        )
    )
    print("\nIngest, one job of the same documents:\n")
    print(markdown_table(["runner", "chunks", "seconds", "chunks/s"], ingest_rows))
    print(f"\nHybrid search through nginx, {args.concurrency} closed-loop clients, {len(queries)} queries, no cache:\n")
    if search_rows:
        print(markdown_table(["replicas", "chunks", "queries/s", "p50 ms", "p95 ms"], search_rows))
    else:
        print("(nginx is not installed: skipped)")


if __name__ == "__main__":
    main()

"""The ``tritonrag`` command line: export models, run Triton and the orchestrator, bring the stack up, ingest files,
measure retrieval quality."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tritonrag.clients.wire.auth import ApiKeyCreate, Scope
from tritonrag.clients.wire.schema import SearchMode, SearchRequest
from tritonrag.deploy.launcher import TritonEndpoints, TritonLaunchError, TritonServer, check_port_free
from tritonrag.deploy.models_cli import models_app
from tritonrag.deploy.options import ConfigOption, load_settings
from tritonrag.export.repository import versions
from tritonrag.export.runtime.contract import ONNX_FILE
from tritonrag.server.config import Settings
from tritonrag.server.errors import NotFoundError
from tritonrag.server.lifecycle.state import loaded_versions
from tritonrag.server.security.keys import KEYS_FILE, KeyStore
from tritonrag.server.store.database import StoreLocation

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


class Task(StrEnum):
    embedder = "embedder"
    reranker = "reranker"
    generator = "generator"


class Target(StrEnum):
    python = "python"
    native = "native"


class Quantization(StrEnum):
    int8 = "int8"
    int4 = "int4"  # the generator only


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="hf:<id>, pypi:<package> or path:<dir>")],
    task: Annotated[Task, typer.Option(help="What the model serves as.")],
    repository: Annotated[Path | None, typer.Option(help="Model repository (default: the configured one).")] = None,
    name: Annotated[str | None, typer.Option(help="Model name in the repository (default: the task).")] = None,
    quantize: Annotated[
        Quantization | None, typer.Option(help="Also quantise the weights (int4: the generator only).")
    ] = None,
    target: Annotated[Target, typer.Option(help="native also writes configs for the full Triton container.")] = (
        Target.python
    ),
    native_repository: Annotated[Path | None, typer.Option(help="Where --target native writes its models.")] = None,
    max_sequence_length: Annotated[
        int | None, typer.Option(min=8, help="Token limit; a generator's context window (default: the model's).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Export a model to ONNX as a new version in the model repository, with a parity check."""
    from tritonrag.export.errors import ExportError
    from tritonrag.export.exporter import export_model

    settings = load_settings(config)
    try:
        result = export_model(
            source,
            task.value,
            repository or settings.triton.repository,
            model_name=name,
            quantize=quantize.value if quantize else None,
            target=target.value,
            max_sequence_length=max_sequence_length,
            native_repository=native_repository,
        )
    except ExportError as exc:
        typer.echo(f"export failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"exported {source} as version {result.version}: {result.version_dir}")
    for key, value in result.parity.items():
        typer.echo(f"  parity {key}: {value}")


def has_version(model_dir: Path) -> bool:
    """True when ``model_dir`` holds at least one exported version."""
    return any((model_dir / str(v) / ONNX_FILE).is_file() for v in versions(model_dir))


def _serve_until_signalled(server: TritonServer) -> int:
    """Run until SIGINT/SIGTERM or until Triton exits; stop Triton cleanly; return an exit code."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        code = server.poll()
        if code is not None:
            typer.echo(f"tritonserver exited with code {code}", err=True)
            return code or 1
    server.stop()
    return 0


def _rollout_versions(settings: Settings) -> dict[str, list[str]]:
    """The versions Triton loads at start, per model, named as the roll-out controller will want them: those its
    state last had loaded, else (a first start) the newest version directory. Named explicitly, so that the
    controller's own load at start changes nothing (a changed version policy makes Triton load every version
    again). None with roll-outs off: the config's version policy decides."""
    if not settings.rollout.enabled:
        return {}
    chosen = {}
    for model in settings.triton.models:
        on_disk = versions(settings.triton.repository / model)
        loaded = loaded_versions(settings.data_dir, model)
        if loaded or on_disk:
            chosen[model] = loaded or [str(on_disk[-1])]
    return chosen


def _start_triton(settings: Settings) -> TritonServer:
    t = settings.triton
    server = TritonServer(
        t.repository,
        TritonEndpoints(t.address, t.http_port, t.grpc_port, t.metrics_port),
        t.models,
        settings.work_dir,
        log_verbose=t.log_verbose,
        versions=_rollout_versions(settings),
    )
    try:
        server.start(timeout_s=t.startup_timeout_s)
    except TritonLaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    ep = server.endpoints
    typer.echo(f"Triton ready: HTTP {ep.http_url}, gRPC {ep.grpc_url}, metrics {ep.metrics_url}")
    typer.echo(f"models: {', '.join(t.models)} from {t.repository}")
    return server


@app.command()
def triton(config: ConfigOption = None) -> None:
    """Run Triton on the model repository until interrupted."""
    server = _start_triton(load_settings(config))
    raise typer.Exit(_serve_until_signalled(server))


def _run_orchestrator(settings: Settings) -> None:
    """Serve the HTTP and gRPC APIs until SIGINT/SIGTERM, logging as ``settings.telemetry`` says."""
    from tritonrag.server.app import serve
    from tritonrag.server.telemetry.logs import configure_logging

    log_writer = configure_logging(settings.telemetry)
    api, telemetry = settings.api, settings.telemetry
    ports = [("HTTP", api.http_port), ("gRPC", api.grpc_port)]
    if telemetry.metrics and telemetry.metrics_port is not None:
        ports.append(("metrics", telemetry.metrics_port))
    try:
        for what, port in ports:
            check_port_free(api.host, port, f"orchestrator {what}")
    except TritonLaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"orchestrator: HTTP http://{api.host}:{api.http_port}/v1 (docs at /docs), gRPC {api.host}:{api.grpc_port}"
    )
    try:
        asyncio.run(serve(settings))
    finally:
        log_writer.stop()  # the lines still queued are written


@app.command("eval")
def eval_command(
    collection: Annotated[str, typer.Option(help="The collection to search.")],
    queries: Annotated[
        Path, typer.Option(help='JSON lines: {"query": "...", "relevant": ["doc-id", ...]}.', exists=True)
    ],
    modes: Annotated[list[SearchMode] | None, typer.Option("--mode", help="Modes to measure (repeatable).")] = None,
    rerank: Annotated[bool, typer.Option(help="Also measure each mode reranked.")] = False,
    url: Annotated[str | None, typer.Option(help="Orchestrator HTTP URL (default: the configured one).")] = None,
    config: ConfigOption = None,
) -> None:
    """Retrieval quality of a collection on your labelled queries: nDCG@10, MRR@10 and Recall@10 per mode
    (documents ranked at their best chunk), with each mode's median latency."""
    from tritonrag.clients.evaluation import QuerySetError, evaluate, read_queries, report
    from tritonrag.clients.http_client import ApiError, TritonRagClient

    settings = load_settings(config)
    try:
        labelled = read_queries(queries)
    except (OSError, QuerySetError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--queries") from exc
    base_url = url or f"http://{settings.api.host}:{settings.api.http_port}"
    results = []
    with TritonRagClient(base_url) as client:
        try:
            for mode in modes or list(SearchMode):
                for reranked in (False, True) if rerank else (False,):
                    search = SearchRequest(collection=collection, query="-", mode=mode, rerank=reranked)
                    label = f"{mode.value}+rerank" if reranked else mode.value
                    results.append(evaluate(client, search, labelled, label))
        except ApiError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(report(results))


EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL: the server stayed unavailable; the same command resumes later


@app.command("ingest")
def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (.txt .md .html .json .jsonl .pdf).")],
    collection: Annotated[str, typer.Option(help="The collection to fill.")],
    url: Annotated[str | None, typer.Option(help="Orchestrator HTTP URL (default: the configured one).")] = None,
    create: Annotated[bool, typer.Option(help="Create the collection when it does not exist.")] = True,
    batch: Annotated[int, typer.Option(min=1, max=1000, help="Documents per request.")] = 32,
    config: ConfigOption = None,
) -> None:
    """Ingest files into a collection with a progress bar and a summary; transient server errors are retried,
    bad documents reported. Exit status 1 when documents failed, 75 when the server stayed unavailable; a rerun
    resumes where a run stopped."""
    from tritonrag.clients.console import ConsoleReporter, result_line
    from tritonrag.clients.extract import extract_paths
    from tritonrag.clients.http_client import ApiError, TritonRagClient
    from tritonrag.clients.ingest import Ingestion, IngestState, ServerUnavailableError

    started = time.monotonic()
    settings = load_settings(config)
    extraction = extract_paths(paths)
    base_url = url or f"http://{settings.api.host}:{settings.api.http_port}"
    state = IngestState(settings.work_dir / "ingest" / f"{collection}.json")
    reporter = ConsoleReporter()
    code, stopped = 0, ""
    with TritonRagClient(base_url) as client:
        ingestion = Ingestion(client, collection, extraction.documents, state, reporter, batch)
        reporter.read(extraction, ingestion.already_there)
        with reporter:
            try:
                ingestion.ensure_collection(create)
                ingestion.run()
            except ServerUnavailableError as exc:
                code, stopped = EXIT_UNAVAILABLE, f"stopped: {exc}; rerun the same command to resume"
            except ApiError as exc:
                code, stopped = 1, f"error: {exc}"
            except KeyboardInterrupt:
                code, stopped = 130, "interrupted; rerun the same command to resume"
    reporter.summary(extraction.errors)
    if stopped:
        typer.echo(stopped, err=True)
    progress = ingestion.progress
    wall_s = time.monotonic() - started
    typer.echo(result_line(progress, collection, ingestion.already_there, len(extraction.errors), wall_s))
    raise typer.Exit(code or int(progress.failed > 0))


keys_app = typer.Typer(
    no_args_is_help=True, help="API keys in the key store (<data_dir>/keys.sqlite, or the shared store of store.url)."
)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")


def _key_store(config: Path | None) -> KeyStore:
    settings = load_settings(config)
    return KeyStore(settings.data_dir / KEYS_FILE, StoreLocation(settings.store.url))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant whose collections the key reaches.")],
    scopes: Annotated[list[Scope], typer.Option("--scope", help="read, write or admin (repeatable).")],
    name: Annotated[str, typer.Option(help="Who holds it, what for.")] = "",
    config: ConfigOption = None,
) -> None:
    """Make a key and print it, this once; only its SHA-256 is stored. A running orchestrator accepts it at once."""
    try:
        request = ApiKeyCreate(tenant=tenant, scopes=scopes, name=name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    created = _key_store(config).create(request.tenant, request.scopes, request.name)
    typer.echo(f"key {created.id} (tenant {created.tenant!r}, {', '.join(created.scopes)}):")
    typer.echo(created.key)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    config: ConfigOption = None,
) -> None:
    """Every key (id, tenant, scopes, name, created, revoked), without secrets."""
    for info in _key_store(config).list(tenant):
        revoked = f"revoked {_when(info.revoked_at)}" if info.revoked_at is not None else "active"
        line = f"{info.id}  {info.tenant}  {','.join(info.scopes)}  {info.name!r}  {_when(info.created_at)}  {revoked}"
        typer.echo(line)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (tritonrag keys list).")], config: ConfigOption = None
) -> None:
    """Revoke a key; every orchestrator over this store refuses it from its next request."""
    try:
        info = _key_store(config).revoke(key_id)
    except NotFoundError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"revoked {info.id} at {_when(info.revoked_at)}")


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


@app.command("serve")
def serve_command(config: ConfigOption = None) -> None:
    """Run the orchestrator (HTTP + gRPC) against already running Triton servers."""
    _run_orchestrator(load_settings(config))


@app.command("worker")
def worker_command(config: ConfigOption = None) -> None:
    """Run a Celery worker of ingestion and re-index jobs (needs ingest.broker_url and store.url)."""
    from tritonrag.server.ingest.celery_jobs import run_worker
    from tritonrag.server.telemetry.logs import configure_logging

    settings = load_settings(config)
    log_writer = configure_logging(settings.telemetry)
    try:
        run_worker(settings)
    finally:
        log_writer.stop()


@app.command()
def up(config: ConfigOption = None) -> None:
    """Bring the stack up on embedded defaults: export missing default models, start Triton and the orchestrator."""
    settings = load_settings(config)
    for name in settings.triton.models:
        if has_version(settings.triton.repository / name):
            continue
        source = settings.default_sources.get(name)
        if source is None:
            typer.echo(f"error: model '{name}' has no version and no default source to export it from", err=True)
            raise typer.Exit(1)
        quantize = settings.default_quantization.get(name)
        typer.echo(f"exporting {name} from {source}{f' ({quantize})' if quantize else ''} (first start only)")
        export(source, Task(name), quantize=Quantization(quantize) if quantize else None, config=config)
    server = _start_triton(settings)
    try:
        _run_orchestrator(settings)
    finally:
        server.stop()


if __name__ == "__main__":
    app()

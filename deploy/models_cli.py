"""``tritonrag models …``: model roll-outs through a running orchestrator's admin API (``/v1/admin/models``).

``publish`` exports a source into a new version directory first (as ``tritonrag export``), or takes a
version already in the repository, then asks the orchestrator to validate and roll it out. Every
command prints the model's status: versions, states, traffic shares, requests and recent events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar, cast

import typer

from tritonrag.clients.http_client import ApiError, TritonRagClient
from tritonrag.clients.wire.models import ModelStatus, RolloutPolicy, VersionState
from tritonrag.deploy.options import ConfigOption, load_settings
from tritonrag.server.config import Settings

if TYPE_CHECKING:
    from tritonrag.export.graphs import Task

T = TypeVar("T")

models_app = typer.Typer(no_args_is_help=True, help="Model versions: status, publish, canary, rollback, retire.")

UrlOption = Annotated[str | None, typer.Option(help="Orchestrator HTTP URL (default: the configured one).")]


def _ask(settings: Settings, url: str | None, call: Callable[[TritonRagClient], T]) -> T:
    """``call`` with a client of the orchestrator; an error answer is printed and exits with status 1."""
    with TritonRagClient(url or f"http://{settings.api.host}:{settings.api.http_port}") as client:
        try:
            return call(client)
        except ApiError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc


def render(status: ModelStatus, events: int = 5) -> str:
    """A model's status as text: the route, a table of versions, the latest events."""
    route = f"stable {status.stable or '-'}"
    if status.canary:
        route += f", canary {status.canary} at {status.canary_share:.0%}"
    lines = [f"{status.name} ({status.task}): {route}"]
    columns = ("version", 7, "state", -11, "share", 5, "requests", 8, "errors", 6, "p95 ms", 7, "loaded on", 9)
    lines.append(
        "  "
        + "  ".join(
            f"{name:<{-width}}" if width < 0 else f"{name:>{width}}"
            for name, width in zip(columns[::2], columns[1::2], strict=True)
        )
    )
    for v in status.versions:
        p95 = f"{v.traffic.p95_ms:.1f}" if v.traffic.p95_ms is not None else "-"
        lines.append(
            f"  {v.version:>7}  {v.state.value:<11}  {v.share:>5.0%}  {v.traffic.requests:>8}  {v.traffic.errors:>6}  "
            f"{p95:>7}  {len(v.loaded_on):>9}{('  ' + v.reason) if v.reason else ''}"
        )
    for event in status.events[:events]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        lines.append(f"  {when}  v{event.version}  {event.event}{(': ' + event.detail) if event.detail else ''}")
    return "\n".join(lines)


@models_app.command("status")
def status_command(
    model: Annotated[str | None, typer.Argument(help="One model (default: every configured model).")] = None,
    url: UrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Versions, states, traffic shares, per-version requests and p95 latency, and recent events."""
    statuses = _ask(load_settings(config), url, lambda c: [c.model_status(model)] if model else c.model_statuses())
    typer.echo("\n\n".join(render(s) for s in statuses))


@models_app.command("list")
def list_command(url: UrlOption = None, config: ConfigOption = None) -> None:
    """One line per model version: model, version, state, share."""
    statuses = _ask(load_settings(config), url, lambda c: c.model_statuses())
    for status in statuses:
        for v in status.versions:
            typer.echo(f"{status.name}\t{v.version}\t{v.state.value}\t{v.share:.0%}")


@models_app.command("publish")
def publish_command(
    model: Annotated[str, typer.Argument(help="The model (embedder, reranker, generator, or a configured name).")],
    source: Annotated[
        str | None, typer.Option(help="Export this source (hf:, pypi:, path:) into a new version first.")
    ] = None,
    version: Annotated[str | None, typer.Option(help="A version directory already in the repository.")] = None,
    task: Annotated[str | None, typer.Option(help="The task, for --source (default: the model's name).")] = None,
    repository: Annotated[
        Path | None, typer.Option(help="The model repository --source exports into (default: the configured one).")
    ] = None,
    policy: Annotated[RolloutPolicy | None, typer.Option(help="immediate or canary (default: configured).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the canary is promoted or rolled back.")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Export (with --source) and roll out a model version: validated, loaded beside the stable version, smoke-tested,
    then given traffic by the policy. Exit status 1 when it is refused or rolled back."""
    settings = load_settings(config)
    if (source is None) == (version is None):
        raise typer.BadParameter("give --source or --version, one of them")
    if source is not None:
        from tritonrag.export.errors import ExportError
        from tritonrag.export.exporter import export_model

        try:  # the exporter refuses an unknown task with the list of tasks
            target = repository or settings.triton.repository
            result = export_model(source, cast("Task", task or model), target, model_name=model)
        except ExportError as exc:
            typer.echo(f"export failed: {exc}", err=True)
            raise typer.Exit(1) from exc
        version = str(result.version)
        typer.echo(f"exported {source} as {model} version {version}: {result.version_dir}")
    published = version
    assert published is not None

    def roll_out(client: TritonRagClient) -> ModelStatus:
        status = client.publish_model(model, published, policy)
        while wait and status.canary == published:
            time.sleep(2.0)
            status = client.model_status(model)
        return status

    status = _ask(settings, url, roll_out)
    typer.echo(render(status))
    state = next((v.state for v in status.versions if v.version == version), None)
    if state in (VersionState.rolled_back, VersionState.failed):
        raise typer.Exit(1)


@models_app.command("rollback")
def rollback_command(
    model: Annotated[str, typer.Argument(help="The model.")],
    reason: Annotated[str, typer.Option(help="Recorded with the rollback.")] = "rolled back by an operator",
    url: UrlOption = None,
    config: ConfigOption = None,
) -> None:
    """End the model's canary, or return to its previous version."""
    typer.echo(render(_ask(load_settings(config), url, lambda c: c.rollback_model(model, reason))))


@models_app.command("retire")
def retire_command(
    model: Annotated[str, typer.Argument(help="The model.")],
    keep: Annotated[int | None, typer.Option(min=1, help="Version directories to keep (default: configured).")] = None,
    url: UrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Unload the versions nothing needs and delete all but the newest --keep of them from disk."""
    typer.echo(render(_ask(load_settings(config), url, lambda c: c.retire_models(model, keep))))

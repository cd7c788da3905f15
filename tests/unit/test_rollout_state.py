"""The roll-out state (models.sqlite), what the launcher reads of it, the roll-out settings and the CLI's status."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tritonrag.clients.wire.models import ModelEvent, ModelStatus, VersionInfo, VersionState, VersionTraffic
from tritonrag.deploy.cli import _rollout_versions
from tritonrag.deploy.models_cli import render
from tritonrag.server.config import RolloutSettings, Settings
from tritonrag.server.lifecycle.state import RolloutState, loaded_versions
from tritonrag.server.routing.versions import Route, VersionRoutes, VersionStats


def test_versions_states_events_and_the_loaded_set_survive_a_reopen(tmp_path: Path) -> None:
    state = RolloutState(tmp_path)
    state.record("reranker", "1", VersionState.stable, "adopted", "served when roll-outs began", share=1.0)
    state.record("reranker", "10", VersionState.validating, "validating")
    state.record("reranker", "10", VersionState.canary, "canary started", "share 5%", share=0.05)
    state.record("reranker", "2", VersionState.failed, "refused", "model.onnx is not an ONNX model")
    state.set_loaded("reranker", {"1", "10"})
    state.close()

    reopened = RolloutState(tmp_path)
    assert [(r.version, r.state, r.share) for r in reopened.versions("reranker")] == [
        ("1", VersionState.stable, 1.0),
        ("2", VersionState.failed, 0.0),
        ("10", VersionState.canary, 0.05),  # numeric order, not text order
    ]
    refused = reopened.get("reranker", "2")
    assert refused is not None and refused.reason.startswith("model.onnx")
    assert [r.version for r in reopened.in_state("reranker", VersionState.canary)] == ["10"]
    assert [(e.version, e.event) for e in reopened.events("reranker")] == [
        ("2", "refused"),
        ("10", "canary started"),
        ("10", "validating"),
        ("1", "adopted"),
    ]
    assert reopened.loaded("reranker") == ["1", "10"]
    assert reopened.versions("generator") == []
    reopened.close()


def test_the_launcher_loads_the_recorded_versions_and_nothing_before_the_first_start(tmp_path: Path) -> None:
    assert loaded_versions(tmp_path, "embedder") is None  # no state yet: the config's policy decides
    state = RolloutState(tmp_path)
    state.record("embedder", "3", VersionState.stable, "adopted")
    state.record("embedder", "4", VersionState.failed, "refused", "runtime hash mismatch")
    state.set_loaded("embedder", {"3"})
    state.set_loaded("embedder", {"3"})  # idempotent
    state.close()
    assert loaded_versions(tmp_path, "embedder") == ["3"]  # the refused version 4 is never loaded at start
    assert loaded_versions(tmp_path, "generator") is None


def test_canary_steps_must_ascend_strictly_between_zero_and_one() -> None:
    assert RolloutSettings(canary_steps=[0.1, 0.5]).canary_steps == [0.1, 0.5]
    for steps in ([], [0.5, 0.1], [0.2, 0.2], [0.5, 1.0], [0.0, 0.5]):
        with pytest.raises(ValidationError, match="canary_steps"):
            RolloutSettings(canary_steps=steps)


def test_routes_draw_the_canary_by_its_share_and_fall_back_to_the_stable_version() -> None:
    routes = VersionRoutes()
    assert routes.candidates("generator") == [None]
    routes.set("generator", Route("1", "2", 0.2))
    draws = [routes.candidates("generator") for _ in range(2000)]
    assert {tuple(d) for d in draws} == {("1",), ("2", "1")}
    assert 300 < sum(d[0] == "2" for d in draws) < 500
    assert routes.primary("generator") == "1"
    assert Route("1", "2", 0.2).shares() == {"1": 0.8, "2": 0.2}
    with pytest.raises(ValueError, match="between 0 and 1"):
        routes.set("generator", Route("1", "2", 1.5))


def test_version_stats_keep_windows_and_totals_apart() -> None:
    stats = VersionStats()
    for latency in (0.010, 0.020, 0.030, 0.040):
        stats.record("reranker", "2", latency)
    stats.record("reranker", "2", 0.0, "[INTERNAL] the runtime raised")
    window = stats.window("reranker", "2")
    assert (window.requests, window.errors, window.p50_s, window.p95_s) == (5, 1, 0.030, 0.040)
    assert window.error_ratio == pytest.approx(0.2)
    assert window.last_error == "[INTERNAL] the runtime raised"
    stats.restart("reranker")
    assert stats.window("reranker", "2").requests == 0
    assert stats.total("reranker", "2").requests == 5


def test_the_cli_renders_a_status_as_a_table_with_the_latest_events() -> None:
    traffic = VersionTraffic(requests=1200, errors=0, p50_ms=4.1, p95_ms=9.8)
    status = ModelStatus(
        name="reranker",
        task="reranker",
        stable="1",
        canary="2",
        canary_share=0.25,
        versions=[
            VersionInfo(
                version="1",
                state=VersionState.stable,
                share=0.75,
                loaded_on=["a", "b"],
                traffic=traffic,
                updated_at=0.0,
            ),
            VersionInfo(
                version="2",
                state=VersionState.canary,
                share=0.25,
                reason="share 25%",
                loaded_on=["a", "b"],
                traffic=VersionTraffic(requests=40, errors=1),
                updated_at=0.0,
            ),
        ],
        events=[ModelEvent(at=0.0, version="2", event="stepped", detail="share 25%")],
    )
    lines = render(status).splitlines()
    assert lines[0] == "reranker (reranker): stable 1, canary 2 at 25%"
    assert lines[2].split() == ["1", "stable", "75%", "1200", "0", "9.8", "2"]
    assert lines[3].split() == ["2", "canary", "25%", "40", "1", "-", "2", "share", "25%"]
    assert lines[4].endswith("v2  stepped: share 25%")


def test_up_names_the_versions_triton_loads_so_the_controllers_first_load_changes_nothing(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for version in ("1", "3"):
        (repository / "embedder" / version).mkdir(parents=True)
    settings = Settings(
        data_dir=tmp_path / "data", triton={"repository": repository, "models": ["embedder", "generator"]}
    )
    assert _rollout_versions(settings) == {"embedder": ["3"]}  # a first start: the newest; no generator at all
    state = RolloutState(tmp_path / "data")
    state.record("embedder", "1", VersionState.stable, "rolled back")
    state.set_loaded("embedder", {"1"})
    state.close()
    assert _rollout_versions(settings) == {"embedder": ["1"]}  # what the state last had loaded
    assert _rollout_versions(settings.model_copy(update={"rollout": RolloutSettings(enabled=False)})) == {}

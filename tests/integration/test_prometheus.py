"""deploy/prometheus/ against the real Prometheus (Debian's package, installed by make): the config and alert
rules pass ``promtool``, the rules' unit tests pass, and a Prometheus scraping an orchestrator sees its series."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.fakes import FakeServices
from tests.harness import serving, wait_until
from tests.promql import PROMETHEUS
from tritonrag.deploy.launcher import free_port
from tritonrag.server.api.admission import Admission
from tritonrag.server.config import ApiSettings, LimitsSettings
from tritonrag.server.telemetry.collectors import registered


def promtool(*args: str) -> str:
    result = subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_config_and_the_alert_rules_are_valid() -> None:
    assert "SUCCESS: 10 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("check", "config", "prometheus.yml")


def test_the_alert_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


@pytest.fixture
def orchestrator() -> Iterator[str]:
    """An orchestrator's HTTP API over the fakes, served in a thread, with a request already counted and its
    load shedder's series registered."""
    admission = Admission(LimitsSettings())
    app = FakeServices.create().http_app(ApiSettings(), admission)
    with TestClient(app) as client:
        client.post("/v1/collections", json={"name": "docs"})
    with registered(admission), serving(app) as url:
        yield url


@pytest.fixture
def prometheus(tmp_path: Path, orchestrator: str) -> Iterator[str]:
    """A Prometheus scraping ``orchestrator`` every second, with the scrape config of deploy/ (its target moved)."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "tritonrag"]
    job["static_configs"] = [{"targets": [urllib.parse.urlparse(orchestrator).netloc]}]
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    """The instant vector of ``expression``; [] while Prometheus is not up or has nothing."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result: list[dict[str, Any]] = json.load(response)["data"]["result"]
    except OSError:
        return []
    return result


def test_prometheus_scrapes_the_orchestrators_series(prometheus: str) -> None:
    created = 'tritonrag_requests_total{route="/v1/collections",method="POST",status="201"}'
    wait_until(lambda: bool(query(prometheus, created)), "Prometheus to scrape the orchestrator", timeout_s=60)
    (series,) = query(prometheus, created)
    assert series["metric"]["job"] == "tritonrag" and series["metric"]["protocol"] == "http"
    assert float(series["value"][1]) >= 1
    (limit,) = query(prometheus, 'tritonrag_inflight_limit{class="answer"}')
    assert limit["value"][1] == str(LimitsSettings().answer)
    assert query(prometheus, "up") and query(prometheus, "up")[0]["value"][1] == "1"

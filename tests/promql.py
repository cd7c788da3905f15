"""The metric names in PromQL expressions: those of the Grafana dashboard and the alert rules under deploy/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tritonrag.server.config import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "tritonrag.json"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"

# Triton's own series that the dashboard reads; tests/integration/test_triton_generator.py finds them on a real Triton.
TRITON_SERIES = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_queue_duration_us",
        "nv_inference_count",
    }
)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTORS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")  # label matchers, ranges
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAMES = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()")  # not a function call, not a number's exponent


def metric_names(expression: str) -> set[str]:
    """The metrics an expression reads: identifiers that are no function, keyword, label or grouping."""
    bare = _GROUPING.sub(" ", _SELECTORS.sub(" ", _STRINGS.sub(" ", expression)))
    return {name for name in _NAMES.findall(bare) if name not in _KEYWORDS and not re.fullmatch(r"\d\w*", name)}


def dashboard_expressions(path: Path = DASHBOARD) -> list[str]:
    """Every target's ``expr`` in a Grafana dashboard, rows' nested panels included."""
    expressions: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            expressions.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return expressions


def alert_expressions(path: Path = PROMETHEUS / "alerts.yml") -> list[str]:
    """Every rule's ``expr`` in a Prometheus rule file."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]

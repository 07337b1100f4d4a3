"""Paths, tools and chart rendering shared by the deploy tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "lpreg"
DASHBOARDS = CHART / "dashboards"
PROMETHEUS = DEPLOY / "prometheus"
# The one copy of the rules: shipped by the chart, mounted by the compose Prometheus.
RULES = CHART / "rules" / "lpreg.rules.yml"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose" / "config.yaml"
VENV_BIN = Path(sys.executable).parent

RELEASE = "lpreg-test"
NAMESPACE = "lpreg-ns"
KUBE_VERSION = "1.32.0"

# Every values file users are pointed at; None is the chart's defaults.
VALUES_FILES: dict[str, Path | None] = {
    "default": None,
    "gpu": CHART / "examples" / "values-gpu.yaml",
    "cpu-tiny": CHART / "examples" / "values-cpu-tiny.yaml",
}

# Metric names, not recording-rule names (lpreg:...:...) that contain them.
METRIC_NAME = re.compile(r"(?<![\w:])lpreg_[a-z0-9_]+")
# Every series selector of a query: a metric name (lpreg's, recording rules', or an external
# exporter's) followed by its label matchers.
ANY_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
# Series that other exporters publish, which the services' exposition cannot contain: NVIDIA's
# dcgm-exporter (GPUs), vLLM's engine statistics, and redis_exporter. Only these prefixes are
# exempt from the check that every queried series is really exported.
EXTERNAL_METRIC_PREFIXES = ("DCGM_FI_", "vllm:", "redis_")


def tool(name: str, *, venv: bool) -> str:
    """Absolute path of a command-line tool, or a test failure saying how to get it."""
    path = VENV_BIN / name if venv else shutil.which(name)
    if path is None or not Path(path).exists():
        where = (
            f"{VENV_BIN} (pip install -e '.[dev]')"
            if venv
            else "PATH (Debian: apt-get install prometheus)"
        )
        pytest.fail(f"{name} is required by the deploy tests but was not found in {where}")
    return str(path)


def run_tool(args: list[str], *, cwd: Path = REPO, stdin: bytes | None = None) -> str:
    """Run a tool; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, timeout=60, check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{out}")
    return out


def load_values(key: str) -> dict[str, Any]:
    path = VALUES_FILES[key]
    return {} if path is None else yaml.safe_load(path.read_text())


@dataclass(frozen=True)
class Rendered:
    """One rendering of the chart: the parsed objects and the raw text per template."""

    values: dict[str, Any]
    objects: list[dict[str, Any]]
    templates: dict[str, str]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
        return found[0]


def render(values: dict[str, Any]) -> Rendered:
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        templates = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(templates.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(values=values, objects=objects, templates=templates)


def rules() -> list[dict[str, Any]]:
    """Every recording rule and alert of the rules file."""
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def dashboard_variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The series selectors inside label_values(...) queries of the template variables."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {var['name']}: {query}"
            out.append(match.group(1))
    return out


def used_metric_names() -> set[str]:
    """Series names (not recording-rule names) that the dashboards and the rules query."""
    used = {name for rule in rules() for name in METRIC_NAME.findall(rule["expr"])}
    for path in DASHBOARDS.glob("*.json"):
        dashboard = load_dashboard(path)
        exprs = [expr for _, expr in dashboard_expressions(dashboard)]
        exprs += dashboard_variable_queries(dashboard)
        used |= {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    return used

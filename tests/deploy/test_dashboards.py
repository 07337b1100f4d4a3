"""Grafana dashboards: structure, templating, and every PromQL expression parsed and checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deployutil import (
    DASHBOARDS,
    METRIC_NAME,
    dashboard_expressions,
    dashboard_panels,
    dashboard_variable_queries,
    load_dashboard,
    run_tool,
)

DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
VARIABLES = {"datasource", "namespace", "run"}
# Concrete stand-ins for Grafana's variables, so promtool can parse the expressions.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
    "$namespace": "ns",
    "$run": "run",
}
SELECTOR = re.compile(r"\b(lpreg_[a-z0-9_]+)\s*(\{[^}]*\})?")


def test_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["lpreg-training.json"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_structure(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard_panels(dashboard):
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), f"{panel['title']} needs a description"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_templating(path: Path) -> None:
    variables = {var["name"]: var for var in load_dashboard(path)["templating"]["list"]}
    assert set(variables) >= VARIABLES
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "run"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert "$namespace" in json.dumps(variables["run"]["query"])


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_selector_is_filtered_by_namespace_and_run(path: Path) -> None:
    for title, expr in dashboard_expressions(load_dashboard(path)):
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: no lpreg metric in {expr}"
        for name, matchers in selectors:
            assert 'namespace="$namespace"' in matchers, (
                f"{title}: {name} lacks the namespace filter"
            )
            assert 'run="$run"' in matchers, f"{title}: {name} lacks the run filter"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_metric_is_exported(path: Path, series_names: set[str]) -> None:
    dashboard = load_dashboard(path)
    used = {
        name for _, expr in dashboard_expressions(dashboard) for name in METRIC_NAME.findall(expr)
    }
    used |= {name for q in dashboard_variable_queries(dashboard) for name in METRIC_NAME.findall(q)}
    missing = used - series_names
    assert not missing, f"metrics not exported by the services: {sorted(missing)}"


def substitute(expr: str) -> str:
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_promql_parses(path: Path, promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression offline as a recording rule."""
    dashboard = load_dashboard(path)
    exprs = [expr for _, expr in dashboard_expressions(dashboard)] + dashboard_variable_queries(
        dashboard
    )
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute(expr)} for i, expr in enumerate(exprs)
    ]
    rule_file = tmp_path / "dashboard.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}))
    out = run_tool([promtool, "check", "rules", str(rule_file)])
    assert f"{len(rules)} rules found" in out

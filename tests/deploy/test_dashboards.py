"""Grafana dashboards: structure, templating, and every PromQL expression parsed and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from deployutil import (
    ANY_SELECTOR,
    DASHBOARDS,
    EXTERNAL_METRIC_PREFIXES,
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
    """Every series is read from the chosen namespace, and every expression is tied to the chosen
    run: lpreg and vLLM series (scraped from the run's pods) by their run label, DCGM series by
    a join with the run's lpreg_build_info."""
    for title, expr in dashboard_expressions(load_dashboard(path)):
        selectors = ANY_SELECTOR.findall(expr)
        assert selectors, f"{title}: no series selector in {expr}"
        for name, matchers in selectors:
            assert 'namespace="$namespace"' in matchers, (
                f"{title}: {name} lacks the namespace filter"
            )
            if name.startswith(("lpreg_", "vllm:", "redis_")):
                assert 'run="$run"' in matchers, f"{title}: {name} lacks the run filter"
        assert any('run="$run"' in matchers for _, matchers in selectors), (
            f"{title}: not filtered by run"
        )


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_external_metrics_are_only_from_allowed_exporters(path: Path) -> None:
    """A panel may query another exporter's series only under an allow-listed prefix; anything
    else must be an lpreg metric, which test_every_metric_is_exported checks."""
    external = set()
    for title, expr in dashboard_expressions(load_dashboard(path)):
        for name, _ in ANY_SELECTOR.findall(expr):
            if name.startswith("lpreg_"):
                continue
            assert name.startswith(EXTERNAL_METRIC_PREFIXES), f"{title}: {name} is not exported"
            external.add(name)
    # What operators watch on GPU runs, by the names those exporters publish.
    assert {
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions_total",
        "redis_memory_used_bytes",
    } <= external


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_operator_panels_exist(path: Path) -> None:
    used = {
        name
        for _, expr in dashboard_expressions(load_dashboard(path))
        for name in METRIC_NAME.findall(expr)
    }
    assert {
        "lpreg_learner_eval_accuracy",
        "lpreg_generator_response_length_tokens_bucket",
        "lpreg_generator_responses_total",
        "lpreg_learner_zero_advantage_groups_total",
        "lpreg_learner_broadcast_failures_total",
        "lpreg_learner_broadcast_bytes_total",
        "lpreg_learner_last_checkpoint_timestamp_seconds",
        "lpreg_redis_stream_undelivered",
        "lpreg_learner_wait_rollouts_seconds_total",
        "lpreg_learner_run_complete",
    } <= used


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

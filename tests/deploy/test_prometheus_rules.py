"""Prometheus: the compose scrape config, the rules and their unit tests, the services' exposition."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deployutil import (
    COMPOSE_FILE,
    DEPLOY,
    METRIC_NAME,
    PROMETHEUS,
    REPO,
    RULES,
    rules,
    run_tool,
)

RULE_TESTS = RULES.with_name("lpreg.rules.test.yml")
ALERTS = {
    "LpregLearnerStalled",
    "LpregGeneratorBehind",
    "LpregDLQGrowing",
    "LpregWeightSyncSlow",
    "LpregEntropyCollapsed",
}


def compose_etc_prometheus(root: Path) -> Path:
    """/etc/prometheus as the compose Prometheus container sees it: its bind mounts, as symlinks."""
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    for mount in service["volumes"]:
        source, target = mount.split(":")[:2]
        if source.startswith("./") and target.startswith("/etc/prometheus/"):
            link = root / target.removeprefix("/etc/prometheus/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((REPO / source).resolve())
    return root


def test_check_config(promtool: str, tmp_path: Path) -> None:
    etc = compose_etc_prometheus(tmp_path)
    out = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=etc)
    # The relative glob finds the chart's rules through the compose mount, and not their tests.
    assert "1 rule files found" in out, out
    assert (etc / "rules" / RULES.name).resolve() == RULES.resolve()


def test_rules_have_one_copy() -> None:
    assert sorted(DEPLOY.rglob("*.rules.yml")) == [RULES]


def test_check_rules(promtool: str) -> None:
    run_tool([promtool, "check", "rules", str(RULES)])


def test_rule_unit_tests(promtool: str) -> None:
    run_tool([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    names = {rule["alert"] for rule in rules() if "alert" in rule}
    assert names >= ALERTS
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for name in names:
        assert cases.get(name) == {True, False}, f"{name} needs a firing and a non-firing case"


def test_generator_behind_threshold_is_the_runs_max_staleness() -> None:
    (rule,) = [rule for rule in rules() if rule.get("alert") == "LpregGeneratorBehind"]
    assert "lpreg_learner_max_staleness" in rule["expr"]
    tested = set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        if any(c["alertname"] == rule["alert"] for c in test.get("alert_rule_test", [])):
            tested |= {
                s["values"]
                for s in test["input_series"]
                if s["series"].startswith("lpreg_learner_max_staleness{")
            }
    assert len(tested) >= 2, "test the alert with runs of different max_staleness"


def test_every_rule_has_severity_and_summary() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_rules_use_only_exported_metrics(series_names: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            assert name in series_names, f"{rule.get('alert') or rule.get('record')}: {name}"
        for name in re.findall(r"\blpreg:[a-z0-9_:]+", rule["expr"]):
            assert name in recorded, f"{rule.get('alert')}: {name} is not recorded"


@pytest.mark.parametrize("component", ["learner", "generator"])
def test_check_metrics_on_real_exposition(promtool: str, component: str) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from services.generator.metrics import GeneratorMetrics
    from services.learner.metrics import LearnerMetrics

    registry = CollectorRegistry()
    {"learner": LearnerMetrics, "generator": GeneratorMetrics}[component](registry, run_id="tiny")
    exposition = generate_latest(registry)
    assert b"lpreg_build_info" in exposition
    run_tool([promtool, "check", "metrics"], stdin=exposition)


def test_compose_scrape_labels_match_the_compose_run() -> None:
    from deployutil import COMPOSE_CONFIG

    run_id = yaml.safe_load(COMPOSE_CONFIG.read_text())["run_id"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    learner_labels = jobs["lpreg-learner"]["static_configs"][0]["labels"]
    assert learner_labels == {"component": "learner", "run": run_id, "namespace": "local"}
    generator = jobs["lpreg-generator"]
    # DNS discovery finds every replica of `docker compose up --scale generator=N`.
    assert generator["dns_sd_configs"][0]["names"] == ["generator"]
    relabel = {r["target_label"]: r["replacement"] for r in generator["relabel_configs"]}
    assert relabel == {"component": "generator", "run": run_id, "namespace": "local"}

"""Prometheus: the compose scrape config, the rules and their unit tests, the services' exposition."""

from __future__ import annotations

import re

import pytest
import yaml
from deployutil import METRIC_NAME, PROMETHEUS, RULES, run_tool

RULE_TESTS = RULES.with_name("lpreg.rules.test.yml")
ALERTS = {
    "LpregLearnerStalled",
    "LpregGeneratorBehind",
    "LpregDLQGrowing",
    "LpregWeightSyncSlow",
    "LpregEntropyCollapsed",
}


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_check_config(promtool: str) -> None:
    out = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    # The rule files are found through the relative glob the container uses as well.
    assert "1 rule files found" in out, out


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

"""Prometheus: the compose scrape config, the rules and their unit tests, the services' exposition."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
    "LpregLearnerDown",
    "LpregLearnerStalled",
    "LpregNoGeneratorsAlive",
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


def rule_tests() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULE_TESTS.read_text())["tests"])


def alert_cases(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(test group, alert case) of every case of one alert."""
    return [
        (test, case)
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]


def stale_series(test: dict[str, Any], prefix: str) -> list[str]:
    """Input series of a test group that stop being exposed (their values end in `stale`)."""
    return [
        s["series"]
        for s in test["input_series"]
        if s["series"].startswith(prefix) and s["values"].split()[-1] == "stale"
    ]


def test_learner_down_fires_when_the_learner_target_is_absent() -> None:
    """A deleted or Pending learner pod has no target, hence no `up` series: the alert must fire
    from the absence too, not only from up == 0."""
    (rule,) = [r for r in rules() if r.get("alert") == "LpregLearnerDown"]
    assert "lpreg_learner_run_complete" in rule["expr"]
    fired_on_absence = set()
    for test, case in alert_cases("LpregLearnerDown"):
        gone = {
            re.search(r'run="([^"]+)"', series).group(1)  # type: ignore[union-attr]
            for series in stale_series(test, 'up{namespace="ns1", run=')
            if 'component="learner"' in series
        }
        learners = {
            re.search(r'run="([^"]+)"', s["series"]).group(1)  # type: ignore[union-attr]
            for s in test["input_series"]
            if s["series"].startswith("up{") and 'component="learner"' in s["series"]
        }
        runs = {a["exp_labels"]["run"] for a in case.get("exp_alerts", [])}
        fired_on_absence |= runs & gone
        fired_on_absence |= {run for run in runs if run not in learners}
    assert len(fired_on_absence) >= 2, "test a learner that vanished and one that never started"


def test_finished_runs_silence_stall_and_availability_alerts() -> None:
    for name in ("LpregLearnerStalled", "LpregNoGeneratorsAlive", "LpregLearnerDown"):
        (rule,) = [r for r in rules() if r.get("alert") == name]
        assert "lpreg_learner_run_complete" in rule["expr"], name
        complete_runs = {
            re.search(r'run="([^"]+)"', s["series"]).group(1)  # type: ignore[union-attr]
            for test, _ in alert_cases(name)
            for s in test["input_series"]
            if s["series"].startswith("lpreg_learner_run_complete{") and " 1" in f" {s['values']}"
        }
        assert complete_runs, f"{name}: test a finished run"
        fired = {
            a["exp_labels"]["run"] for _, case in alert_cases(name) for a in case["exp_alerts"]
        }
        assert not complete_runs & fired, f"{name} fires for a finished run"


def test_departed_generators_leave_no_ghost_alert() -> None:
    """A generator's weight-version series ends when it leaves; the tests show it then neither
    fires LpregGeneratorBehind nor keeps a version-lag line."""
    ghosts = set()
    for test, case in alert_cases("LpregGeneratorBehind"):
        for series in stale_series(test, "lpreg_learner_generator_weight_version{"):
            generator = re.search(r'generator="([^"]+)"', series).group(1)  # type: ignore[union-attr]
            fired = {a["exp_labels"]["generator"] for a in case["exp_alerts"]}
            assert generator not in fired
            assert fired, "the same test shows a live generator that is behind still fires"
            lagging = {
                sample["labels"]
                for expr in test.get("promql_expr_test", [])
                for sample in expr["exp_samples"]
                if expr["expr"] == "lpreg:generator_version_lag"
            }
            assert lagging and not any(generator in labels for labels in lagging)
            ghosts.add(generator)
    assert ghosts, "test a generator that leaves"


def test_forget_generator_removes_its_series() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from services.learner.metrics import LearnerMetrics

    registry = CollectorRegistry()
    metrics = LearnerMetrics(registry, run_id="tiny")
    metrics.generator_weight_version.labels(generator="gen-a").set(4)
    metrics.generator_weight_version.labels(generator="gen-b").set(5)
    metrics.forget_generator("gen-a")
    metrics.forget_generator("never-reported")
    exposition = generate_latest(registry).decode()
    assert 'generator="gen-a"' not in exposition
    assert 'lpreg_learner_generator_weight_version{generator="gen-b"} 5.0' in exposition


def test_run_complete_gauge() -> None:
    from prometheus_client import CollectorRegistry

    from services.learner.metrics import LearnerMetrics

    registry = CollectorRegistry()
    metrics = LearnerMetrics(registry, run_id="tiny")
    assert registry.get_sample_value("lpreg_learner_run_complete") == 0.0
    metrics.set_run_complete()
    assert registry.get_sample_value("lpreg_learner_run_complete") == 1.0


def test_wait_clock_counts_a_wait_in_progress() -> None:
    """The HPA reads the wait share between steps: a long wait must show while it lasts."""
    from prometheus_client import CollectorRegistry

    from services.learner.metrics import RolloutWaitClock

    now = [100.0]
    clock = RolloutWaitClock(clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(clock)

    def total() -> float | None:
        return registry.get_sample_value("lpreg_learner_wait_rollouts_seconds_total")

    assert total() == 0.0
    clock.start()
    now[0] += 30.0
    assert total() == 30.0
    clock.start()  # nested or repeated starts do not restart the wait
    now[0] += 10.0
    clock.stop()
    now[0] += 50.0
    assert total() == 40.0
    clock.stop()
    assert total() == 40.0


def test_backlog_keeps_its_value_when_redis_cannot_tell() -> None:
    from prometheus_client import CollectorRegistry

    from services.learner.metrics import LearnerMetrics

    registry = CollectorRegistry()
    metrics = LearnerMetrics(registry, run_id="tiny")
    metrics.set_backlog({"prompts": 40, "rollouts": 3})
    metrics.set_backlog({"prompts": None, "rollouts": 0})
    value = registry.get_sample_value
    assert value("lpreg_redis_stream_undelivered", {"stream": "prompts"}) == 40.0
    assert value("lpreg_redis_stream_undelivered", {"stream": "rollouts"}) == 0.0


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

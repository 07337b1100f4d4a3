"""Live: a real learner and generator, scraped by a real Prometheus that loads the chart's rules.

Everything binds to 127.0.0.1 on free ports: redis-server (the redis_server fixture), the learner
(gRPC, TCPStore, /metrics), one generator (/metrics) and prometheus (web API). The static checks
(test_dashboards, test_prometheus_rules) read the metric classes; this one reads what the running
processes really expose and what Prometheus really stores and evaluates.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from deployutil import REPO, RULES, rules, run_tool, tool, used_metric_names
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONFIG = REPO / "examples" / "tiny" / "config.yaml"
RUN = "tiny"
NAMESPACE = "live"
# Covers start-up (torch import, model load, first weight publish) and the first step on a slow
# machine; polling ends as soon as the condition holds.
READY_TIMEOUT_S = 110.0
POLL_S = 0.25
# Per stop round (learner, then the rest): the learner finishes its step and checkpoints.
STOP_GRACE_S = 15.0
# A departed generator is dead once its Control stream closes or its heartbeat ttl (10 s) lapses.
GENERATOR_GONE_TIMEOUT_S = 40.0
# Loopback only: no request may be routed through a proxy named in the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

T = TypeVar("T")


def http_get(url: str) -> bytes:
    with HTTP.open(url, timeout=5) as response:
        return bytes(response.read())


@dataclass
class Processes:
    """Children of this test, each in its own session, stopped by PID."""

    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def report(self) -> str:
        return "\n".join(f"--- {name} log\n{self.log_tail(name)}" for name in self.procs)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(
                    f"{name} (pid {proc.pid}) exited with {proc.returncode}\n{self.report()}"
                )

    def stop(self, names: list[str]) -> None:
        """SIGTERM, then SIGKILL whatever is still running after the grace period."""
        running = [self.procs[n] for n in names if n in self.procs]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        # The learner first: while the generator is still up it can finish its step and publish,
        # and it then tells the generator to stop.
        self.stop(["learner"])
        self.stop(list(self.procs))


@dataclass
class Live:
    procs: Processes
    prometheus: str
    metrics: dict[str, str]
    deadline: float

    def wait_for(self, what: str | Callable[[], str], probe: Callable[[], T | None]) -> T:
        """Poll probe until it returns something truthy; fail with the logs at the deadline, or
        as soon as a process exits. ``what`` may be a callable, read at the deadline."""
        error: OSError | None = None
        while True:
            self.procs.check_alive()
            try:
                value = probe()
            except OSError as e:  # not listening yet
                value, error = None, e
            if value:
                return value
            if time.monotonic() > self.deadline:
                detail = f" (last error: {error})" if error else ""
                said = what() if callable(what) else what
                pytest.fail(f"timed out waiting for {said}{detail}\n{self.procs.report()}")
            time.sleep(POLL_S)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(http_get(f"{self.prometheus}{path}{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/query", query=promql)["result"])


def distinct_ports(free_port: Callable[[], int], n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def prometheus_config(learner_port: int, generator_port: int) -> dict[str, Any]:
    """Like deploy/prometheus/prometheus.yml: the labels the dashboard and the rules select by."""

    def job(component: str, port: int) -> dict[str, Any]:
        labels = {"component": component, "run": RUN, "namespace": NAMESPACE}
        return {
            "job_name": f"lpreg-{component}",
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
        }

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [job("learner", learner_port), job("generator", generator_port)],
    }


@pytest.fixture
def live(redis_server: Any, free_port: Callable[[], int], tmp_path: Path) -> Iterator[Live]:
    prometheus = tool("prometheus", venv=False)
    grpc, store, learner_metrics, generator_metrics, web = distinct_ports(free_port, 5)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        LPREG_REDIS_URL=redis_server.url,
        LPREG_AUTH_TOKEN=secrets.token_hex(16),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    overrides = [
        f"local.run_dir={tmp_path / 'run'}",
        # Far more steps than the test lasts: the learner is still training when it is scraped.
        "learner.steps=200",
        "learner.eval_every_steps=0",
        f"control.port={grpc}",
        f"broadcast.store_port={store}",
        f"metrics.learner_port={learner_metrics}",
        f"metrics.generator_port={generator_metrics}",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    cli = [sys.executable, "-m", "services.cli"]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(learner_metrics, generator_metrics)))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        procs.start("learner", [*cli, "learner", str(CONFIG), *sets], env)
        procs.start(
            "generator",
            [*cli, "generator", str(CONFIG), "--id", "gen-0", *sets],
            {**env, "LPREG_LEARNER_ADDRESS": f"127.0.0.1:{grpc}"},
        )
        procs.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            env,
        )
        yield Live(
            procs=procs,
            prometheus=f"http://127.0.0.1:{web}",
            metrics={
                "learner": f"http://127.0.0.1:{learner_metrics}/metrics",
                "generator": f"http://127.0.0.1:{generator_metrics}/metrics",
            },
            deadline=time.monotonic() + READY_TIMEOUT_S,
        )
    finally:
        procs.stop_all()


def sample_names(exposition: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}


def test_prometheus_scrapes_the_running_services(live: Live, promtool: str) -> None:
    def targets_up() -> dict[str, dict[str, Any]] | None:
        targets = {t["labels"]["job"]: t for t in live.api("/api/v1/targets")["activeTargets"]}
        up = {job: t["health"] == "up" for job, t in targets.items()}
        return targets if up == {"lpreg-learner": True, "lpreg-generator": True} else None

    targets = live.wait_for("both scrape targets up", targets_up)
    for component in ("learner", "generator"):
        labels = targets[f"lpreg-{component}"]["labels"]
        assert (labels["run"], labels["namespace"], labels["component"]) == (
            RUN,
            NAMESPACE,
            component,
        )

    for promql, component in (
        ("lpreg_learner_policy_version", "learner"),
        ("lpreg_generator_tokens_total", "generator"),
    ):
        (sample,) = live.wait_for(f"a sample of {promql}", lambda q=promql: live.query(q))
        assert sample["metric"]["run"] == RUN, sample
        assert sample["metric"]["namespace"] == NAMESPACE, sample
        assert sample["metric"]["component"] == component, sample
        float(sample["value"][1])
    (staleness,) = live.query("lpreg_learner_max_staleness")
    assert float(staleness["value"][1]) == 1.0, "examples/tiny/config.yaml sets max_staleness: 1"

    # Families with labels (weight sync phases, per-generator versions) get their first samples
    # with the first publish and step, so poll until every series the dashboard and the rules
    # query has one.
    used = used_metric_names()
    expositions: dict[str, str] = {}
    missing: set[str] = set()

    def all_used_series_exposed() -> bool:
        expositions.update({c: http_get(url).decode() for c, url in live.metrics.items()})
        exposed = set().union(*(sample_names(text) for text in expositions.values()))
        missing.clear()
        missing.update(used - exposed)
        return not missing

    def never_exposed() -> str:
        return f"samples of every queried series; never exposed: {sorted(missing)}"

    live.wait_for(never_exposed, all_used_series_exposed)
    for text in expositions.values():
        run_tool([promtool, "check", "metrics"], stdin=text.encode())

    # The chart's rules, loaded by this Prometheus, evaluate without errors on the real series.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        loaded = [r for g in live.api("/api/v1/rules")["groups"] for r in g["rules"]]
        return loaded if all(r["health"] != "unknown" for r in loaded) else None

    loaded = live.wait_for("every rule evaluated", rules_evaluated)
    assert len(loaded) == len(rules())
    errors = {r["name"]: r["lastError"] for r in loaded if r["health"] != "ok"}
    assert not errors, errors
    (lag,) = live.wait_for(
        "the recorded version lag of gen-0",
        lambda: live.query('lpreg:generator_version_lag{generator="gen-0"}'),
    )
    assert (lag["metric"]["run"], lag["metric"]["namespace"]) == (RUN, NAMESPACE), lag

    # Series the service loops drive, beyond declaring them: the backlog gauge the learner
    # refreshes from XINFO GROUPS lag, the wait clock around its wait for rollouts (the first
    # step waits for the generator), one observation per sampled completion.
    driven: list[tuple[str, Callable[[float], bool]]] = [
        ('lpreg_redis_stream_undelivered{stream="prompts"}', lambda v: v >= 0),
        ("lpreg_learner_wait_rollouts_seconds_total", lambda v: v > 0),
        ("sum(lpreg_generator_responses_total)", lambda v: v > 0),
        ("lpreg_generator_response_length_tokens_count", lambda v: v > 0),
    ]
    for promql, holds in driven:
        samples = live.wait_for(
            f"{promql} driven by the service",
            lambda q=promql, ok=holds: [r for r in live.query(q) if ok(float(r["value"][1]))],
        )
        assert samples, promql

    # A generator that leaves takes its per-generator series with it: no ghost line on the
    # version-lag panel, no LpregGeneratorBehind for ever (the learner refreshes on a timer, so
    # it notices while it waits for rollouts that will not come).
    ghost = 'lpreg_learner_generator_weight_version{generator="gen-0"}'
    assert ghost in http_get(live.metrics["learner"]).decode()
    live.procs.stop(["generator"])
    del live.procs.procs["generator"]
    live.deadline = time.monotonic() + GENERATOR_GONE_TIMEOUT_S
    live.wait_for(
        "the learner to drop the departed generator's series",
        lambda: ghost not in http_get(live.metrics["learner"]).decode(),
    )

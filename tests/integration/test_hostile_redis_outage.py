"""A Redis outage on a real local deployment (redis-server, learner, two generators): every
service keeps retrying through a 20 s stop of redis-server (redis.outage_tolerance_s), and once
the server is back on the same port and data directory the run finishes with nothing lost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.local.cluster import TERMINATE_GRACE_S, LocalCluster, wait_for_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
OUTAGE_S = 20.0
STEPS = 6
PROMPTS_PER_STEP = 4
STEP_TIMEOUT_S = 120
FAST = [
    f"learner.steps={STEPS}",
    f"learner.prompts_per_step={PROMPTS_PER_STEP}",
    "learner.eval_every_steps=0",
    "learner.checkpoint.every_steps=2",
    "learner.publish_timeout_s=10",
    "broadcast.join_timeout_s=5",
    "generator.heartbeat_interval_s=0.5",
    "generator.heartbeat_ttl_s=3",
    "redis.claim_idle_ms=2000",
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(CONFIG, tmp_path / "run", list(FAST))
    try:
        yield c
    finally:
        c.stop_all()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_every_service_rides_through_a_20s_redis_stop(cluster: LocalCluster) -> None:
    cluster.start_redis()
    cluster.start_learner()
    for gid in ("gen-0", "gen-1"):
        cluster.start_generator(gid)
    wait_for_step(cluster, 2, STEP_TIMEOUT_S)
    assert cluster.redis is not None
    cluster.redis.terminate()  # redis-server flushes its append-only file and exits
    cluster.redis.wait(timeout=TERMINATE_GRACE_S)
    time.sleep(OUTAGE_S)
    # Without the outage window every one of them had exited 1 after ~11 s of retries.
    down = {name: p.returncode for name, p in cluster.all_processes() if p.poll() is not None}
    assert set(down) == {"redis-server"}, down
    cluster.start_redis()  # same port, same data directory
    assert cluster.learner is not None
    code = cluster.learner.wait(timeout=STEP_TIMEOUT_S * 3)
    log = (cluster.logs / "learner.log").read_text()
    assert code == 0, log[-4000:]
    assert "retry" in log  # it did see the outage
    summary = json.loads((cluster.run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["prompts_unaccounted"] == 0, summary
    assert summary["groups_trained"] == summary["prompts_trained"] == STEPS * PROMPTS_PER_STEP
    # Both generators survived and ended with the run (Shutdown), at the final version.
    for gid, proc in cluster.generators.items():
        assert proc.wait(timeout=STEP_TIMEOUT_S) == 0, (cluster.logs / f"{gid}.log").read_text()[
            -3000:
        ]
    assert set(summary["generator_weight_versions"]) == {"gen-0", "gen-1"}

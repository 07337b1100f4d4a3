"""Short fault injections on a real deployment (redis-server, learner, generators, gRPC, Gloo):
nothing is lost and nothing hangs. benchmarks/chaos.py runs the long version."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.local.cluster import LocalCluster, read_metrics, wait_for_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
# Small deadlines so faults are noticed within seconds; the waits below are bounded by them.
FAST_FAULTS = [
    "learner.prompts_per_step=4",
    "learner.eval_every_steps=0",
    "learner.checkpoint.every_steps=2",
    "learner.publish_timeout_s=10",
    "broadcast.join_timeout_s=5",
    "generator.heartbeat_interval_s=0.5",
    "generator.heartbeat_ttl_s=3",
    "redis.claim_idle_ms=2000",
]
STEP_TIMEOUT_S = 120


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(CONFIG, tmp_path / "run", [*FAST_FAULTS])
    try:
        yield c
    finally:
        c.stop_all()


def finish(cluster: LocalCluster) -> dict:
    assert cluster.learner is not None
    code = cluster.learner.wait(timeout=STEP_TIMEOUT_S * 2)
    log = (cluster.logs / "learner.log").read_text()[-4000:]
    assert code == 0, log
    summary = json.loads((cluster.run_dir / "summary.json").read_text())
    assert summary["prompts_unaccounted"] == 0, summary
    return summary


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_killed_generator_tasks_are_reclaimed_and_training_finishes(cluster: LocalCluster) -> None:
    cluster.overrides.append("learner.steps=5")
    cluster.start_redis()
    cluster.start_learner()
    cluster.start_generator("gen-0")
    cluster.start_generator("gen-1")
    wait_for_step(cluster, 1, STEP_TIMEOUT_S)
    cluster.kill(cluster.generators["gen-1"], signal.SIGKILL)
    summary = finish(cluster)
    assert summary["steps"] == 5
    assert summary["generator_weight_versions"]["gen-0"] == 5


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_killed_learner_resumes_and_replays_unacked_groups(cluster: LocalCluster) -> None:
    cluster.overrides += ["learner.steps=9", "learner.checkpoint.every_steps=3"]
    cluster.start_redis()
    cluster.start_learner()
    cluster.start_generator("gen-0")
    wait_for_step(cluster, 4, STEP_TIMEOUT_S)
    cluster.kill(cluster.learner, signal.SIGKILL)
    ckpt_step = int((cluster.run_dir / "checkpoints" / "latest").read_text().strip()[5:])
    trained_before_kill = max(int(r["step"]) for r in read_metrics(cluster.run_dir))  # type: ignore[call-overload]
    # Steps after the checkpoint were trained, but their groups were never acknowledged.
    assert 3 <= ckpt_step < trained_before_kill
    cluster.start_learner(resume=True)
    summary = finish(cluster)
    assert summary["steps"] == 9
    # The restored weights got a fresh version past everything the lost learner published.
    assert summary["policy_version"] > 9
    # The generator survived the learner restart and follows the resumed version sequence.
    assert summary["generator_weight_versions"] == {"gen-0": summary["policy_version"]}
    assert summary["groups_trained"] == summary["prompts_trained"] == 9 * 4


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_redis_restart_mid_run_loses_nothing(cluster: LocalCluster) -> None:
    cluster.overrides.append("learner.steps=5")
    cluster.start_redis()
    cluster.start_learner()
    cluster.start_generator("gen-0")
    wait_for_step(cluster, 2, STEP_TIMEOUT_S)
    cluster.restart_redis()
    summary = finish(cluster)
    assert summary["steps"] == 5
    assert summary["generator_weight_versions"] == {"gen-0": 5}

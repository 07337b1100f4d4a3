"""The main job end to end: `lpreg local` with a real redis-server, learner and generator
processes, gRPC control and Gloo weight broadcast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from localrun import ROOT, run_local
from localrun import TINY_CONFIG as CONFIG


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_three_step_local_run_every_generator_loads_final_version(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = run_local(
        run_dir,
        "learner.steps=3",
        "learner.prompts_per_step=4",
        "learner.eval_every_steps=0",
        "learner.checkpoint.every_steps=2",
    )
    assert summary["steps"] == 3
    assert summary["policy_version"] == 3
    assert summary["groups_trained"] == 12
    assert summary["generator_weight_versions"] == {"gen-0": 3, "gen-1": 3}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["publish_ok"] for r in rows)
    for name in ("reward.png", "entropy.png", "lpreg.png"):
        assert (run_dir / "plots" / name).stat().st_size > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert (run_dir / "final_model" / "config.json").exists()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_corrupt_rollout_goes_to_dlq_while_training_continues(tmp_path: Path, redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    key = "lpreg:dlqtest:rollouts"
    client.xgroup_create(key, "learner", id="0", mkstream=True)
    client.xadd(key, {"data": b"\x08\x01\xff\xfe not a protobuf"})
    client.xadd(key, {"garbage": b"no payload field"})
    summary = run_local(
        tmp_path / "run",
        "run_id=dlqtest",
        f"local.redis_url={redis_server.url}",
        "learner.steps=2",
        "learner.prompts_per_step=4",
        "learner.eval_every_steps=0",
        "local.num_generators=1",
    )
    assert summary["steps"] == 2
    assert summary["rollouts_in_dlq"] == 2
    reasons = {f[b"reason"] for _, f in client.xrange("lpreg:dlqtest:dlq")}
    assert reasons <= {b"decode", b"validate", b"schema_version", b"too_large"} and reasons


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_process_and_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    import signal
    import time

    import psutil

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "services.cli", "local", str(CONFIG)]
    for o in (
        f"local.run_dir={run_dir}",
        "learner.steps=500",
        "learner.prompts_per_step=4",
        "learner.eval_every_steps=0",
    ):
        argv += ["--set", o]
    launcher = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert launcher.poll() is None, "lpreg local exited early"
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.2)
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 4  # redis-server, learner, 2 generators
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) == 130  # interrupted, as a shell reports Ctrl-C
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert (run_dir / "checkpoints" / "latest").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 2 <= summary["steps"] < 500
    assert summary["completed"] is False and "interrupted" in summary["reason"]

"""`lpreg local --set local.learner_procs=2`: the learner under torchrun (2 Gloo ranks on the CPU)
trains the tiny task end to end, publishes to the generator, writes sharded checkpoints and the
final model; the run then resumes in one plain learner process from those checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from localrun import ROOT, TINY_CONFIG, run_local

from services.learner.checkpoint import is_sharded, latest_checkpoint

SMALL = (
    "local.num_generators=1",
    "learner.prompts_per_step=8",
    "learner.checkpoint.every_steps=2",
    "learner.eval_every_steps=0",
)


@pytest.mark.slow
def test_two_learner_ranks_train_and_one_process_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = run_local(run_dir, "local.learner_procs=2", "learner.steps=4", *SMALL, timeout_s=500)
    assert summary["completed"] and summary["steps"] == 4
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None and newest.name == "step_00000004" and is_sharded(newest)
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "learner rank 0 of 2" in log and "learner rank 1 of 2" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # The generator loaded the weights the two ranks published.
    assert all(r["num_tokens"] > 0 for r in steps)

    argv = [sys.executable, "-m", "services.cli", "local", str(TINY_CONFIG), "--resume"]
    for o in (f"local.run_dir={run_dir}", "local.progress=false", "learner.steps=5", *SMALL):
        argv += ["--set", o]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=500,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["completed"] and resumed["steps"] == 5
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None and newest.name == "step_00000005" and is_sharded(newest)
    # One process wrote this checkpoint: a single shard file.
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp"]

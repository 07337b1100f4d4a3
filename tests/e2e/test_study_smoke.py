"""The entropy study's script end to end at smoke size (2 steps, GRPO and Lp-Reg, seed 0)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "study_entropy.py"


@pytest.mark.timeout(600)
def test_study_smoke_writes_finite_summary_and_plots(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "entropy-study.json").read_text())
    assert summary["study"] == "smoke"
    for key in ("steps", "entropy_window", "last_steps", "reward_levels", "eval_prompts"):
        assert key in summary["pre_registered"]
    arms = summary["arms"]
    for name in ("grpo", "lpreg"):
        arm = arms[name]
        assert arm["run"] is True
        assert arm["seeds"] == [0]
        assert arm["vocab_size"] >= 1000
        assert arm["where"] == "cpu, 2 cores"
        metrics = arm["metrics"]
        for key in (
            "entropy_first",
            "entropy_window",
            "entropy_last",
            "reward_last",
            "eval_greedy_accuracy",
            "eval_avg_at_k",
            "eval_pass_at_1",
            "eval_pass_at_2",
            "eval_entropy",
            "eval_response_tokens",
            "tail_mass_all_last",
            "style_entropy_last",
        ):
            value = metrics[key]["mean"]
            assert value is not None and math.isfinite(value), (name, key, value)
            assert metrics[key]["n"] == 1
        assert 0.0 <= metrics["eval_greedy_accuracy"]["mean"] <= 1.0
        assert metrics["entropy_window"]["mean"] > 0.0
        assert 0.0 < metrics["tail_mass_all_last"]["mean"] < 1.0
    # Arms not asked for are listed with the reason, never silently missing.
    for name in ("lpreg_beta4", "lpreg_async", "lpreg_offpolicy"):
        assert arms[name]["run"] is False and arms[name]["why_not"]
    assert "lpreg_minus_grpo" in summary["comparisons"]
    for png in (
        "entropy-study-entropy.png",
        "entropy-study-reward.png",
        "entropy-study-entropy-vs-reward.png",
    ):
        assert (tmp_path / png).stat().st_size > 1000

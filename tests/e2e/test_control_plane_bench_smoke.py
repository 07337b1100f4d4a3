"""benchmarks/bench_control_plane.py at its smallest: a real learner, redis-server and one member
host with two members over real gRPC and Gloo. Checks the JSON's fields and that both members
registered once, took part in every publish and loaded the final version; no timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PER_COUNT_FIELDS = (
    "registration_s",
    "publish_to_all_loaded_s",
    "redis_commands_per_s",
    "learner_cpu_share",
    "dropped_wrongly",
    "stalled",
    "loaded_final_version",
    "final_version",
)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_two_members_register_and_load_the_final_version(tmp_path: Path) -> None:
    out = tmp_path / "control_plane.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_control_plane.py",
            "--members",
            "2",
            "--steps",
            "4",
            "--warmup-steps",
            "1",
            "--stall-s",
            "120",
            "--timeout-s",
            "240",
            "--out",
            str(out),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["max_members_ok"] == 2

    result = report["results"]["2"]
    for field in PER_COUNT_FIELDS:
        assert field in result, field
    assert result["stalled"] is False, result["stall_reason"]
    assert result["dropped_wrongly"] == 0, result["dropped_reasons"]
    assert result["member_records"] == 2
    assert result["final_version"] == 4
    assert result["loaded_final_version"] == 2
    assert result["steps"] == 4
    assert result["publishes_missing_a_member"] == 0
    assert result["publish_to_all_loaded_s"]["n"] == 4
    assert result["registration_s"] >= 0
    assert result["redis_commands_per_s"] > 0
    assert result["learner_cpu_share"] >= 0
    assert result["broadcast_bytes"] > 0

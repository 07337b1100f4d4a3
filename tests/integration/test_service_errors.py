"""Bad input at the service boundary fails fast and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "tiny" / "config.yaml"


def lpreg(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_malformed_config_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  prompts_per_step: -1\n")
    proc = lpreg("config", "show", str(bad))
    assert proc.returncode == 2
    assert "learner.prompts_per_step" in proc.stderr


def test_config_show_prints_resolved_overrides() -> None:
    proc = lpreg("config", "show", str(CONFIG), "--set", "learner.steps=11")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 11" in proc.stdout


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_unreachable_redis_is_a_clear_error_after_bounded_retries(
    free_port, tmp_path: Path
) -> None:
    port = free_port()
    proc = lpreg(
        "learner",
        str(CONFIG),
        "--set",
        "redis.connect_retries=2",
        "--set",
        "redis.retry_backoff_s=0.05",
        "--set",
        f"local.run_dir={tmp_path}",
        "--set",
        "control.port=0",
        "--set",
        "broadcast.store_port=0",
        "--set",
        "metrics.learner_port=0",
        env={"LPREG_REDIS_URL": f"redis://127.0.0.1:{port}/0", "LPREG_AUTH_TOKEN": "t0ken"},
    )
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_learner_refuses_to_start_without_auth_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LPREG_AUTH_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "learner",
            str(CONFIG),
            "--set",
            f"local.run_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert "LPREG_AUTH_TOKEN" in proc.stderr

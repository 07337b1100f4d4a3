"""The launcher waits for the learner's own exit: generators leaving first (they exit when the
learner announces the end of the run) must not get a finishing learner stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lpreg_core.config import load_config
from services.local import launcher

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.yaml"


class FakeCluster:
    """Processes that behave like a run's last moments: generators already gone, the learner
    still writing its summary for a while."""

    def __init__(self, config_path: str, run_dir: Path, overrides: list[str], **_: object) -> None:
        self.run_dir = run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.generators: dict[str, subprocess.Popen[bytes]] = {}
        self.learner: subprocess.Popen[bytes] | None = None
        self.redis_url = "redis://127.0.0.1:1/0"
        self.metrics_port = 0

    def use_redis(self, url: str) -> None:
        self.redis_url = url

    def start_learner(self, *, resume: bool = False) -> subprocess.Popen[bytes]:
        summary = {"run_id": "tiny", "steps": 3, "completed": True, "reason": "finished"}
        script = (
            "import json, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "time.sleep(3)\n"
            f"open({str(self.run_dir / 'summary.json')!r}, 'w').write({json.dumps(summary)!r})\n"
        )
        self.learner = subprocess.Popen([sys.executable, "-c", script])
        return self.learner

    def start_generator(self, generator_id: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        self.generators[generator_id] = proc
        return proc

    def stop_all(self) -> None:
        for proc in [*self.generators.values(), self.learner]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_generators_exiting_first_do_not_stop_a_finishing_learner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "LocalCluster", FakeCluster)
    run_dir = tmp_path / "run"
    overrides = [f"local.run_dir={run_dir}", "local.redis_url=redis://127.0.0.1:1/0"]
    overrides += ["local.progress=false", "learner.steps=3"]
    config = load_config(CONFIG, overrides)
    code = launcher.run_local(config, config_path=str(CONFIG), overrides=overrides)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 0
    assert summary["completed"] is True and summary["learner_exit_code"] == 0

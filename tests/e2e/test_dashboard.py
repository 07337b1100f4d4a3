"""`lpreg dashboard RUN_DIR`: TensorBoard of a run on loopback, loaded in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from localrun import ROOT

from services.common.loggers import make_loggers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("reward", "entropy", "lpreg", "staleness", "throughput", "eval")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    loggers = make_loggers(["tensorboard"], tmp_path, "dash", {})
    for step in range(1, 6):
        loggers.log_record(
            {
                "step": step,
                "reward_mean": 0.1 * step,
                "entropy": 1.0 / step,
                "num_regularized": float(step),
                "staleness_mean": 0.5,
                "tokens_per_s": 100.0 * step,
                "eval_accuracy": 0.2 * step,
            }
        )
    loggers.close()
    return tmp_path


@pytest.fixture
def dashboard(run_dir: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "dashboard", str(run_dir), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("lpreg dashboard: http://127.0.0.1:"), line
        yield line.split()[2]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_serves_every_section_on_loopback(dashboard: str) -> None:
    tags = json.loads(urllib.request.urlopen(dashboard + "data/plugin/scalars/tags").read())
    names = {tag.split("/")[0] for run in tags.values() for tag in run}
    assert set(SECTIONS) <= names


def test_dashboard_without_events_says_what_to_pass(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "services.cli", "dashboard", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "runs/tiny" in res.stderr


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (scripts/setup.sh installs it as root)"
)
def test_dashboard_renders_in_headless_chromium(dashboard: str, tmp_path: Path) -> None:
    import matplotlib.image

    assert CHROMIUM is not None
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    browser += ["--virtual-time-budget=15000", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "dashboard.png"
    res = subprocess.run(
        [*browser, "--window-size=1280,900", f"--screenshot={shot}", dashboard + "#timeseries"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), res.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1280)
    # TensorBoard's orange header bar is drawn (the app loaded, not an error page) ...
    header = pixels[:40, :, :3].reshape(-1, 3)
    orange = ((header[:, 0] > 0.85) & (header[:, 1] > 0.35) & (header[:, 1] < 0.6)).mean()
    assert orange > 0.5
    # ... and the page below it is not blank.
    body = pixels[80:, :, :3].reshape(-1, 3)
    assert len({tuple(p) for p in (body * 8).astype(int)}) > 10
    dom = subprocess.run(
        [*browser, "--dump-dom", dashboard + "#timeseries"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # Every section heading is drawn; cards are drawn as they scroll into view (the first one).
    for section in SECTIONS:
        assert f">{section}<" in dom.replace(" ", "").replace("\n", ""), section
    assert "entropy/entropy" in dom

"""Run `lpreg local` as a user would, for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "examples" / "tiny" / "config.yaml"


def run_local(
    run_dir: Path, *overrides: str, config: Path = TINY_CONFIG, timeout_s: float = 300
) -> dict[str, Any]:
    """Run a whole local job to completion; returns its summary.json (fails with log tails)."""
    argv = [sys.executable, "-m", "services.cli", "local", str(config)]
    for o in (f"local.run_dir={run_dir}", "local.progress=false", *overrides):
        argv += ["--set", o]
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, (
        f"lpreg local failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}"
    )
    return json.loads((run_dir / "summary.json").read_text())

"""Live progress of a local run, read from the learner's metrics log: one table row per step
with a progress bar and the time left, the pre-training evaluation as step 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HEADER = (
    f"{'step':>5} {'ver':>4} {'reward':>7} {'entropy':>8} {'reg':>5} {'kl':>8} {'stale':>6} "
    f"{'tok/s':>8} {'eval':>6}   progress"
)
BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_bar(done: int, total: int, eta_s: float | None) -> str:
    frac = min(1.0, done / total) if total else 1.0
    filled = int(round(frac * BAR_WIDTH))
    eta = "" if eta_s is None else f" eta {format_duration(eta_s)}"
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}{eta}"


class Progress:
    def __init__(
        self, metrics_path: Path, total_steps: int, *, enabled: bool = True, out: Any = None
    ) -> None:
        self.path = metrics_path
        self.total = total_steps
        self.enabled = enabled
        self.out = out if out is not None else sys.stdout
        self._offset = 0
        self._printed_header = False
        # (time, step) of the first step seen: the ETA is the rate since then.
        self._first: tuple[float, int] | None = None

    def skip_existing(self) -> None:
        """A resumed run: show only the steps from here on."""
        if self.path.exists():
            self._offset = self.path.stat().st_size

    def eta_s(self, step: int, now: float) -> float | None:
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if step <= s0:
            return None
        return (now - t0) / (step - s0) * max(0, self.total - step)

    def line(self, r: dict[str, Any], now: float) -> str:
        ev = r.get("eval_accuracy")
        evs = "" if ev is None else f"{ev:.3f}"
        if int(r["step"]) == 0:
            return f"{0:>5} {r.get('version', 0):>4} {'':>7} {'':>8} {'':>5} {'':>8} {'':>6} {'':>8} {evs:>6}   before training"
        step = int(r["step"])
        return (
            f"{step:>5} {r['version']:>4} {r.get('reward_mean', 0):>7.3f} "
            f"{r.get('entropy', 0):>8.4f} {int(r.get('num_regularized', 0)):>5} "
            f"{r.get('loss_kl', 0):>8.1e} {r.get('staleness_mean', 0):>6.2f} "
            f"{r.get('tokens_per_s', 0):>8.1f} {evs:>6}   "
            # The learner's own clock: rows read in one poll still give the true rate.
            + progress_bar(step, self.total, self.eta_s(step, float(r.get("time", now))))
        )

    def poll(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        now = time.monotonic()
        for line in complete.splitlines():
            if not line.strip():
                continue
            if not self._printed_header:
                print(HEADER, file=self.out, flush=True)
                self._printed_header = True
            print(self.line(json.loads(line), now), file=self.out, flush=True)

    def finish(self, summary: dict[str, Any], plots: list[Path]) -> None:
        if not self.enabled:
            return
        print("\nsummary:", json.dumps(summary, indent=2), sep="\n", file=self.out)
        if plots:
            print("plots:", *[str(p) for p in plots], sep="\n  ", file=self.out)

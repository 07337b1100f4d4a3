"""Live progress of a local run, read from the learner's metrics log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = f"{'step':>5} {'ver':>4} {'reward':>7} {'entropy':>8} {'reg':>5} {'kl':>8} {'stale':>6} {'tok/s':>8} {'eval':>6}"


class Progress:
    def __init__(self, metrics_path: Path, total_steps: int, *, enabled: bool = True) -> None:
        self.path = metrics_path
        self.total = total_steps
        self.enabled = enabled
        self._offset = 0
        self._printed_header = False

    def _line(self, r: dict[str, Any]) -> str:
        ev = r.get("eval_accuracy")
        return (
            f"{r['step']:>5} {r['version']:>4} {r.get('reward_mean', 0):>7.3f} {r.get('entropy', 0):>8.4f} "
            f"{int(r.get('num_regularized', 0)):>5} {r.get('loss_kl', 0):>8.1e} "
            f"{r.get('staleness_mean', 0):>6.2f} {r.get('tokens_per_s', 0):>8.1f} "
            f"{'' if ev is None else f'{ev:.3f}':>6}"
        )

    def poll(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            if not line.strip():
                continue
            if not self._printed_header:
                print(HEADER, flush=True)
                self._printed_header = True
            print(
                self._line(json.loads(line)) + f"   [{json.loads(line)['step']}/{self.total}]",
                flush=True,
            )

    def finish(self, summary: dict[str, Any], plots: list[Path]) -> None:
        print("\nsummary:", json.dumps(summary, indent=2), sep="\n", file=sys.stdout)
        if plots:
            print("plots:", *[str(p) for p in plots], sep="\n  ")

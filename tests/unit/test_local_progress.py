"""The local run's table: step 0 (evaluation before training), progress bar, ETA, closing line."""

from __future__ import annotations

import io
import json
from pathlib import Path

from services.local.launcher import closing_line
from services.local.progress import Progress, format_duration, progress_bar


def test_bar_and_durations() -> None:
    assert progress_bar(0, 10, None) == "[....................] 0/10"
    assert progress_bar(5, 10, 65) == "[##########..........] 5/10 eta 1m05s"
    assert format_duration(7200 + 180) == "2h03m"


def test_table_shows_step_zero_and_an_eta(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    progress = Progress(path, 4, out=out)
    rows = [{"step": 0, "version": 0, "eval_accuracy": 0.5}]
    rows += [{"step": s, "version": s, "reward_mean": 0.25} for s in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:2] == ["step", "ver"]
    assert "0.500" in lines[1] and "before training" in lines[1]
    assert lines[2].endswith("1/4")  # no rate yet after the first step
    assert " 2/4 eta " in lines[3]


def test_resumed_table_skips_the_earlier_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "version": 1}) + "\n")
    out = io.StringIO()
    progress = Progress(path, 4, out=out)
    progress.skip_existing()
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2, "version": 2}) + "\n")
    progress.poll()
    assert [line.split()[0] for line in out.getvalue().splitlines()] == ["step", "2"]


def test_closing_line_has_the_headline_figures_and_the_folder() -> None:
    summary = {
        "completed": True,
        "steps": 500,
        "reward_mean_first_fifth": 0.47,
        "reward_mean_last_fifth": 0.64,
        "eval_accuracy_start": 0.53,
        "eval_accuracy_last": 0.83,
    }
    line = closing_line(summary, Path("runs/tiny"), 201, 500)
    assert line.startswith("lpreg local: finished 500/500 steps in 3m21s")
    assert "0.470 -> 0.640" in line and "0.530 -> 0.830" in line
    assert "run folder runs/tiny" in line and "lpreg dashboard runs/tiny" in line
    stopped = closing_line({"completed": False, "reason": "interrupted (Ctrl-C)"}, Path("r"), 5, 9)
    assert "NOT finished (interrupted (Ctrl-C))" in stopped

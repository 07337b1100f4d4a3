"""`lpreg dashboard RUN_DIR`: the run's TensorBoard (event files in RUN_DIR/tensorboard, written
by the learner's tensorboard logger) on a loopback port. No Docker, no Prometheus."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

from services.common.loggers import TENSORBOARD_DIR


def tensorboard_dir(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    return run if run.name == TENSORBOARD_DIR else run / TENSORBOARD_DIR


def start_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> str:
    """Start TensorBoard in this process; returns its URL."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(
        argv=[
            "tensorboard",
            "--logdir",
            str(tensorboard_dir(run_dir)),
            "--host",
            host,
            "--port",
            str(port),
            "--reload_interval",
            "5",
        ]
    )
    return str(board.launch())


def run_dashboard(run_dir: str, host: str, port: int) -> int:
    logdir = tensorboard_dir(run_dir)
    if not logdir.is_dir():
        print(
            f"lpreg dashboard: no {logdir}: pass a run folder written by `lpreg local` or "
            "`lpreg learner` (with metrics.loggers including tensorboard), e.g. runs/tiny",
            file=sys.stderr,
        )
        return 2
    url = start_dashboard(run_dir, host, port)
    print(f"lpreg dashboard: {url} (TensorBoard of {logdir}; Ctrl-C stops it)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0

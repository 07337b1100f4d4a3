"""`lpreg local`: a whole training job on one machine.

Starts a private redis-server (AOF on) on a free loopback port, the learner, and N generator
processes - the same processes Kubernetes runs - then follows the learner's metrics log, and on
exit leaves under the run directory: summary.json, metrics.jsonl, plots/*.png, checkpoints/,
final_model/, logs/ and redis/. Ctrl-C stops everything; no child outlives the launcher.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from typing import Any

from lpreg_core.config import RunConfig, dump_config
from services.learner.main import run_dir_of
from services.local.cluster import LocalCluster
from services.local.plots import write_plots
from services.local.progress import Progress

log = logging.getLogger("lpreg.local")

# After the learner exits, generators get this long to receive the shutdown event and exit.
GENERATOR_EXIT_GRACE_S = 20.0
# A learner asked to stop checkpoints first; past this it is killed.
LEARNER_STOP_GRACE_S = 120.0


def run_local(config: RunConfig, *, config_path: str, overrides: list[str]) -> int:
    run_dir = run_dir_of(config)
    if (run_dir / "metrics.jsonl").exists():
        run_dir = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    # The learner starts issuing once every generator is up, so all of them serve from step 1.
    overrides = [*overrides, f"learner.min_generators={config.local.num_generators}"]
    cluster = LocalCluster(config_path, run_dir, overrides, redis_server=config.local.redis_server)
    stopping = {"flag": False}

    def _interrupt(signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    start = time.monotonic()
    progress = Progress(
        run_dir / "metrics.jsonl", config.learner.steps, enabled=config.local.progress
    )
    try:
        if config.local.redis_url:
            cluster.use_redis(config.local.redis_url)
        else:
            cluster.start_redis()
        (run_dir / "config.yaml").write_text(dump_config(config))
        learner = cluster.start_learner()
        for i in range(config.local.num_generators):
            cluster.start_generator(f"gen-{i}")
        print(
            f"lpreg local: run {config.run_id} in {run_dir} | redis {cluster.redis_url} | "
            f"learner metrics http://127.0.0.1:{cluster.metrics_port}/metrics | "
            f"{config.local.num_generators} generators | logs in {run_dir}/logs",
            flush=True,
        )
        while learner.poll() is None and not stopping["flag"]:
            progress.poll()
            if all(g.poll() is not None for g in cluster.generators.values()):
                print(f"lpreg local: all generators exited; see {run_dir}/logs", file=sys.stderr)
                break
            time.sleep(0.5)
        progress.poll()
        if learner.poll() is None:
            print("\nlpreg local: stopping (the learner checkpoints first)", flush=True)
            learner.send_signal(signal.SIGTERM)
        try:
            learner.wait(timeout=LEARNER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            learner.kill()
            learner.wait()
        deadline = time.monotonic() + GENERATOR_EXIT_GRACE_S
        for g in cluster.generators.values():
            try:
                g.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.info("generator pid %d still running; stopping it", g.pid)
    finally:
        cluster.stop_all()
    summary_path = run_dir / "summary.json"
    code = None if cluster.learner is None else cluster.learner.returncode
    if not summary_path.exists():
        print(
            f"lpreg local: the learner wrote no summary (exit {code}); see {run_dir}/logs/learner.log",
            file=sys.stderr,
        )
        return 1
    summary = json.loads(summary_path.read_text())
    summary["launcher_wall_s"] = round(time.monotonic() - start, 2)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots = write_plots(run_dir / "metrics.jsonl", run_dir / "plots")
    progress.finish(summary, plots)
    return 0 if code == 0 else 1

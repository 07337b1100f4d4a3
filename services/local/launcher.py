"""`lpreg local`: a whole training job on one machine.

Starts a private redis-server (AOF on) on a free loopback port, the learner, and N generator
processes - the same processes Kubernetes runs - then follows the learner's metrics log, and on
exit leaves under the run directory: summary.json, metrics.jsonl, plots/*.png, checkpoints/,
final_model/, logs/ and redis/. Ctrl-C stops everything; no child outlives the launcher.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import redis as redis_lib

from lpreg_core.config import RunConfig, dump_config
from services.learner.main import run_dir_of
from services.local.plots import write_plots
from services.local.progress import Progress

log = logging.getLogger("lpreg.local")

# After the learner exits, generators get this long to receive the shutdown event and exit.
GENERATOR_EXIT_GRACE_S = 20.0
# SIGTERM first; whatever is still alive after this is killed.
TERMINATE_GRACE_S = 10.0
REDIS_START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Children:
    """Child processes started by the launcher, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")
        self._logs.append(out)
        # A session of its own: Ctrl-C reaches only the launcher, which then stops children in
        # order (generators after the learner has checkpointed).
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()


def start_redis(children: Children, config: RunConfig, run_dir: Path) -> tuple[str, int]:
    binary = shutil.which(config.local.redis_server)
    if binary is None:
        raise RuntimeError(
            f"{config.local.redis_server!r} not found on PATH: install Redis "
            "(Debian/Ubuntu: `sudo apt-get install redis-server`, or run `make setup` as root)"
        )
    port = free_port()
    data = run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--protected-mode",
        "yes",
    ]
    children.start("redis-server", argv, dict(os.environ), run_dir / "logs" / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not answer on port {port}; see {run_dir}/logs/redis.log"
                ) from None
            time.sleep(0.05)
    client.close()
    return url, port


def run_local(config: RunConfig, *, config_path: str, overrides: list[str]) -> int:
    run_dir = run_dir_of(config)
    if (run_dir / "metrics.jsonl").exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = run_dir.with_name(f"{run_dir.name}-{stamp}")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    children = Children()
    stopping = {"flag": False}

    def _interrupt(signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    start = time.monotonic()
    learner: subprocess.Popen[bytes] | None = None
    progress = Progress(
        run_dir / "metrics.jsonl", config.learner.steps, enabled=config.local.progress
    )
    try:
        redis_url = config.local.redis_url or start_redis(children, config, run_dir)[0]
        grpc_port, store_port, metrics_port = free_port(), free_port(), free_port()
        env = dict(os.environ)
        env.update(
            LPREG_AUTH_TOKEN=secrets.token_hex(16),
            LPREG_REDIS_URL=redis_url,
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
        )
        resolved = [
            *overrides,
            f"local.run_dir={run_dir}",
            f"control.port={grpc_port}",
            f"control.learner_address=127.0.0.1:{grpc_port}",
            f"broadcast.store_port={store_port}",
            f"metrics.learner_port={metrics_port}",
        ]
        (run_dir / "config.yaml").write_text(dump_config(config))
        base = [sys.executable, "-m", "services.cli"]
        learner = children.start(
            "learner",
            [*base, "learner", config_path, *[a for o in resolved for a in ("--set", o)]],
            env,
            run_dir / "logs" / "learner.log",
        )
        generators = []
        for i in range(config.local.num_generators):
            gen_overrides = [*resolved, f"metrics.generator_port={free_port()}"]
            generators.append(
                children.start(
                    f"generator-{i}",
                    [
                        *base,
                        "generator",
                        config_path,
                        "--id",
                        f"gen-{i}",
                        *[a for o in gen_overrides for a in ("--set", o)],
                    ],
                    env,
                    run_dir / "logs" / f"generator-{i}.log",
                )
            )
        print(
            f"lpreg local: run {config.run_id} in {run_dir} | redis {redis_url} | "
            f"learner metrics http://127.0.0.1:{metrics_port}/metrics | "
            f"{config.local.num_generators} generators | logs in {run_dir}/logs",
            flush=True,
        )
        while learner.poll() is None and not stopping["flag"]:
            progress.poll()
            dead = [i for i, g in enumerate(generators) if g.poll() is not None]
            if len(dead) == len(generators):
                print(f"lpreg local: all generators exited; see {run_dir}/logs", file=sys.stderr)
                break
            time.sleep(0.5)
        progress.poll()
        if stopping["flag"]:
            print(
                "\nlpreg local: interrupted; stopping (the learner checkpoints first)", flush=True
            )
            learner.send_signal(signal.SIGTERM)
        try:
            learner.wait(timeout=120)
        except subprocess.TimeoutExpired:
            learner.kill()
        deadline = time.monotonic() + GENERATOR_EXIT_GRACE_S
        for g in generators:
            try:
                g.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        children.stop_all()
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        code = None if learner is None else learner.returncode
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
    return 0 if learner is not None and learner.returncode == 0 else 1

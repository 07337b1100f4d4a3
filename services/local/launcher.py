"""`lpreg local`: a whole training job on one machine.

Starts a private redis-server (AOF on) on a free loopback port, the learner, and N generator
processes - the same processes Kubernetes runs - then follows the learner's metrics log, and on
exit leaves under the run directory: summary.json, metrics.jsonl, plots/*.png, tensorboard/,
checkpoints/, final_model/, logs/ and redis/. Ctrl-C stops everything and still writes a summary
(``"completed": false`` with the reason); no child outlives the launcher, even a SIGKILLed one.

``--resume [RUN_DIR]`` continues a run: the same run directory, its redis-server restarted on the
run's own append-only file (so the issued-prompt ledger and unacknowledged rollouts come back),
and the learner restored from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lpreg_core.config import RunConfig, dump_config
from services.common.startup import check_or_raise, model_dir_problems, redis_url_problems
from services.learner.main import run_dir_of
from services.local.cluster import LocalCluster
from services.local.plots import write_plots
from services.local.progress import Progress, format_duration

log = logging.getLogger("lpreg.local")

# After every generator exited, the learner gets this long to finish on its own (it may be in
# its final publish or writing final_model) before it is asked to stop.
GENERATORS_GONE_GRACE_S = 60.0
# A learner asked to stop checkpoints first; past this it is killed.
LEARNER_STOP_GRACE_S = 120.0
# After the learner exits, generators get this long to receive the shutdown event and exit.
GENERATOR_EXIT_GRACE_S = 20.0
# Exit status of a run stopped by Ctrl-C (the shell convention for SIGINT).
EXIT_INTERRUPTED = 130
LOG_TAIL_LINES = 15


class LocalStartError(RuntimeError):
    """The run cannot start; the message says what to change."""


def resolve_run_dir(config: RunConfig, resume: str | bool | None) -> tuple[Path, bool]:
    """The run directory and whether this launch is a resume."""
    if resume:
        run_dir = Path(resume) if isinstance(resume, str) else run_dir_of(config)
        if not (run_dir / "checkpoints").is_dir():
            raise LocalStartError(
                f"--resume: {run_dir} holds no checkpoints/ to continue from; name the run "
                "folder of an earlier `lpreg local` run (lpreg local CONFIG --resume runs/NAME)"
            )
        return run_dir, True
    run_dir = run_dir_of(config)
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        run_dir = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return run_dir, False


def preflight(config: RunConfig) -> None:
    """Everything that can be checked before a file or process is made."""
    problems = model_dir_problems(config.model.path)
    if config.local.redis_url:
        problems += redis_url_problems(config.local.redis_url, "local.redis_url")
    elif shutil.which(config.local.redis_server) is None:
        problems.append(
            f"local.redis_server: {config.local.redis_server!r} not found on PATH; install Redis "
            "(Debian/Ubuntu: `sudo apt-get install redis-server`, or `make setup` as root), or "
            "use an existing one with --set local.redis_url=redis://HOST:PORT/0"
        )
    check_or_raise(problems)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        if line.strip().endswith("}"):
            steps.append(int(json.loads(line).get("step", 0)))
    return max(steps)


def run_local(
    config: RunConfig,
    *,
    config_path: str,
    overrides: list[str],
    resume: str | bool | None = None,
) -> int:
    start = time.monotonic()
    stopping = {"signals": 0}

    def _interrupt(signum: int, _frame: Any) -> None:
        stopping["signals"] += 1
        if stopping["signals"] > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: stop the children now

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        preflight(config)
        run_dir, resuming = resolve_run_dir(config, resume)
    except (LocalStartError, RuntimeError) as e:
        print(f"lpreg local: {e}", file=sys.stderr)
        return 2
    if stopping["signals"]:
        print("lpreg local: interrupted before the start; nothing was started", file=sys.stderr)
        return EXIT_INTERRUPTED
    created = not run_dir.exists()
    # The learner starts issuing once every generator is up, so all of them serve from step 1.
    overrides = [*overrides, f"learner.min_generators={config.local.num_generators}"]
    cluster = LocalCluster(
        config_path,
        run_dir,
        overrides,
        redis_server=config.local.redis_server,
        learner_procs=config.local.learner_procs,
    )
    progress = Progress(
        run_dir / "metrics.jsonl", config.learner.steps, enabled=config.local.progress
    )
    if resuming:
        progress.skip_existing()
    code: int | None = None
    try:
        if config.local.redis_url:
            cluster.use_redis(config.local.redis_url)
        else:
            cluster.start_redis()
        (run_dir / "config.yaml").write_text(dump_config(config))
        learner = cluster.start_learner(resume=resuming)
        for i in range(config.local.num_generators):
            cluster.start_generator(f"gen-{i}")
        print(
            f"lpreg local: {'resuming' if resuming else 'run'} {config.run_id} in {run_dir} | "
            f"redis {cluster.redis_url} | learner metrics "
            f"http://127.0.0.1:{cluster.metrics_port}/metrics | "
            f"{config.local.num_generators} generators | logs in {run_dir}/logs",
            flush=True,
        )
        gone_since: float | None = None
        while learner.poll() is None and not stopping["signals"]:
            progress.poll()
            if all(g.poll() is not None for g in cluster.generators.values()):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > GENERATORS_GONE_GRACE_S:
                    first = next(iter(cluster.generators))
                    print(
                        f"lpreg local: every generator exited; the last lines of {first}'s log:\n"
                        f"{_tail(run_dir / 'logs' / f'{first}.log')}\n(all logs in {run_dir}/logs)",
                        file=sys.stderr,
                    )
                    break
            time.sleep(0.5)
        progress.poll()
        if learner.poll() is None:
            print("\nlpreg local: stopping (the learner checkpoints first)", flush=True)
            learner.send_signal(signal.SIGTERM)
        try:
            code = learner.wait(timeout=LEARNER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            learner.kill()
            code = learner.wait()
        deadline = time.monotonic() + GENERATOR_EXIT_GRACE_S
        for g in cluster.generators.values():
            try:
                g.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.info("generator pid %d still running; stopping it", g.pid)
    except KeyboardInterrupt:
        print("\nlpreg local: stopping at once (second Ctrl-C)", file=sys.stderr, flush=True)
    except RuntimeError as e:
        print(f"lpreg local: {e}", file=sys.stderr)
    finally:
        cluster.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code is None and cluster.learner is not None:
        code = cluster.learner.returncode
    interrupted = stopping["signals"] > 0
    return _conclude(config, config_path, run_dir, start, code, interrupted, created, progress)


def _conclude(
    config: RunConfig,
    config_path: str,
    run_dir: Path,
    start: float,
    code: int | None,
    interrupted: bool,
    created: bool,
    progress: Progress,
) -> int:
    summary_path = run_dir / "summary.json"
    steps = _last_step(run_dir)
    resume_cmd = f"lpreg local {config_path} --resume {run_dir}"
    has_checkpoint = (run_dir / "checkpoints" / "latest").exists()
    if not summary_path.exists() and not interrupted and steps == 0 and not has_checkpoint:
        # A failed start: say why, then leave nothing behind (a later run reuses the name).
        learner_log = run_dir / "logs" / "learner.log"
        print(
            f"lpreg local: the learner failed to start (exit {code}); last lines of its log:\n"
            f"{_tail(learner_log)}",
            file=sys.stderr,
        )
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        return 1
    summary: dict[str, Any] = {}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = {"run_id": config.run_id, "steps": steps, "completed": False}
    completed = bool(summary.get("completed", False))
    if not completed:
        why = "interrupted (Ctrl-C)" if interrupted else f"the learner exited with code {code}"
        summary["completed"] = False
        summary["reason"] = f"{why} after step {steps} of {config.learner.steps}" + (
            f"; continue with: {resume_cmd}" if has_checkpoint else ""
        )
    summary["learner_exit_code"] = code
    summary["launcher_wall_s"] = round(time.monotonic() - start, 2)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots = write_plots(run_dir / "metrics.jsonl", run_dir / "plots")
    progress.finish(summary, plots)
    print(
        closing_line(summary, run_dir, time.monotonic() - start, config.learner.steps), flush=True
    )
    if completed and code == 0:
        return 0
    if interrupted:
        return EXIT_INTERRUPTED
    print(f"lpreg local: see {run_dir}/logs/learner.log", file=sys.stderr)
    return 1


def _arrow(a: Any, b: Any) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{fmt(a)} -> {fmt(b)}"


def closing_line(summary: dict[str, Any], run_dir: Path, wall_s: float, total: int) -> str:
    """What happened and where to look, in one line."""
    head = (
        f"finished {summary.get('steps', 0)}/{total} steps"
        if summary.get("completed")
        else f"NOT finished ({summary.get('reason', 'stopped')})"
    )
    parts = [f"lpreg local: {head} in {format_duration(wall_s)}"]
    if summary.get("reward_mean_first_fifth") is not None:
        parts.append(
            "reward (first/last fifth) "
            + _arrow(summary.get("reward_mean_first_fifth"), summary.get("reward_mean_last_fifth"))
        )
    if summary.get("eval_accuracy_last") is not None:
        start = summary.get("eval_accuracy_start", summary.get("eval_accuracy_first"))
        parts.append("greedy eval accuracy " + _arrow(start, summary.get("eval_accuracy_last")))
    parts.append(
        f"run folder {run_dir} (summary.json, plots/, final_model/; "
        f"dashboard: lpreg dashboard {run_dir})"
    )
    return " | ".join(parts)

"""Fault injection on a real local deployment; prints one JSON object.

Runs a training of S steps (real redis-server, learner, generators, gRPC, Gloo) while it
kills -9 a generator twice (each is restarted), adds a new generator mid-run, kills -9 the
learner once and restarts it with --resume, and restarts redis-server once. Then it reports the
data accounting of the run and whether anything stalled.

    python benchmarks/chaos.py [--steps 30] [--out chaos.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.local.cluster import LocalCluster, read_metrics, wait_for_step  # noqa: E402

CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
# A learner silent for longer than this (between two logged steps) counts as a hang.
HANG_THRESHOLD_S = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps of the run")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    s = args.steps
    if s < 12:
        parser.error("--steps must be >= 12 to fit the fault schedule")
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="lpreg-chaos-")) / "run"
    overrides = [
        "run_id=chaos",
        f"learner.steps={s}",
        f"learner.prompts_per_step={args.prompts_per_step}",
        "learner.eval_every_steps=0",
        "learner.checkpoint.every_steps=3",
        "learner.publish_timeout_s=10",
        "broadcast.join_timeout_s=5",
        "generator.heartbeat_interval_s=0.5",
        "generator.heartbeat_ttl_s=3",
        "redis.claim_idle_ms=2000",
    ]
    cluster = LocalCluster(CONFIG, run_dir, overrides)
    # (step after which the fault fires, description, action)
    schedule = [
        (
            max(2, s // 10),
            "kill -9 generator gen-0, restart it",
            lambda: restart_generator(cluster, "gen-0"),
        ),
        (max(3, s // 6), "add generator gen-2", lambda: cluster.start_generator("gen-2")),
        (
            max(5, s // 4),
            "kill -9 generator gen-1, restart it",
            lambda: restart_generator(cluster, "gen-1"),
        ),
        (
            max(7, s * 2 // 5),
            "kill -9 learner, restart with --resume",
            lambda: restart_learner(cluster),
        ),
        (max(9, s * 3 // 5), "restart redis-server", cluster.restart_redis),
    ]
    events = []
    hangs = 0
    start = time.monotonic()
    try:
        cluster.start_redis()
        cluster.start_learner()
        for gid in ("gen-0", "gen-1"):
            cluster.start_generator(gid)
        for step, what, action in schedule:
            wait_for_step(cluster, step, HANG_THRESHOLD_S)
            t = time.monotonic()
            action()
            events.append({"after_step": step, "fault": what, "t_s": round(t - start, 2)})
            print(f"chaos: after step {step}: {what}", file=sys.stderr, flush=True)
        assert cluster.learner is not None
        try:
            cluster.learner.wait(timeout=HANG_THRESHOLD_S + 10 * s)
        except Exception:  # the learner never finished: that is a hang, reported, then stopped
            hangs += 1
    finally:
        cluster.stop_all()
    wall_s = time.monotonic() - start
    rows = read_metrics(run_dir)
    times = sorted(float(r["time"]) for r in rows)  # type: ignore[arg-type]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    max_stall = max(gaps, default=0.0)
    hangs += sum(1 for g in gaps if g > HANG_THRESHOLD_S)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not summary:
        hangs += 1
    result = {
        "steps": s,
        "steps_completed": summary.get("steps", max((int(r["step"]) for r in rows), default=0)),  # type: ignore[call-overload]
        "prompts_issued": summary.get("prompts_issued"),
        "prompts_trained": summary.get("prompts_trained"),
        "prompts_reissued_stale": summary.get("groups_dropped_stale"),
        "prompts_in_dlq": summary.get("rollouts_in_dlq"),
        "prompts_outstanding": summary.get("prompts_outstanding"),
        "prompts_unaccounted": summary.get("prompts_unaccounted"),
        "max_learner_stall_s": round(max_stall, 2),
        "hangs": hangs,
        "generator_versions_final": summary.get("generator_weight_versions"),
        "policy_version_final": summary.get("policy_version"),
        "faults": events,
        "wall_s": round(wall_s, 1),
        "run_dir": str(run_dir),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["prompts_unaccounted"] == 0 and hangs == 0 else 1


def restart_generator(cluster: LocalCluster, gid: str) -> None:
    cluster.kill(cluster.generators[gid], signal.SIGKILL)
    cluster.start_generator(gid)


def restart_learner(cluster: LocalCluster) -> None:
    cluster.kill(cluster.learner, signal.SIGKILL)
    cluster.start_learner(resume=True)


if __name__ == "__main__":
    sys.exit(main())

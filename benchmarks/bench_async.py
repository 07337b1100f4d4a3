"""Synchronous vs asynchronous training of the tiny task, same loads, same run; prints one JSON.

Two real local deployments (redis-server, the learner, one generator: services.local.cluster),
one after the other (the pair repeated --repeats times), differing only in learner.max_staleness:
0 (synchronous on-policy: the generator samples while the learner waits, then the learner trains
while the generator waits)
and --async-staleness (default 2: the generator samples the next steps' groups while the learner
trains). The learner is pinned to CPU 0 and the generator to CPU 1 (sched_setaffinity, one
thread each), so the asynchronous run can overlap the two on a 2-core machine. The loads are set
so a step's generation and training take similar time (--prompts-per-step, --samples,
--max-new-tokens, --updates-per-step); the synchronous run's mean wait_s (generation) and
train_s show the balance as measured (gen_s, train_s). A tiny model's sampling costs per prompt
(one batched generate call per prompt), its training per sequence: 24 prompts x 4 samples balance
the two on one core each.

  *_s_per_step          wall clock per step from the learner's metrics log, from the end of step
                        --warmup-steps to the end of step S (start-up excluded)
                        (the median over the repeats; *_s_per_step_all lists each run)
  speedup               sync_s_per_step / async_s_per_step (goal >= 1.6 on 2 cores);
                        speedup_all gives each pair's own ratio
  *_wasted_fraction     generated tokens never trained / all generated tokens that reached the
                        learner (summary.json; goal <= 0.05 for the asynchronous run); the worst
                        run of the repeats
  *_final_reward        mean training reward over the last fifth of the steps (the speed-up must
                        not cost learning), first pair; *_first_reward over the first fifth
  sync, async           the first pair's runs in detail

    .venv/bin/python benchmarks/bench_async.py [--steps 40]
    .venv/bin/python benchmarks/bench_async.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.local.cluster import LocalCluster, read_metrics  # noqa: E402

CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
LEARNER_CPU = 0
GENERATOR_CPU = 1
# Per step, generously: a loaded machine can be several times slower than an idle one.
STEP_TIMEOUT_S = 120.0
START_TIMEOUT_S = 300.0


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads it starts later inherit it)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
    except (FileNotFoundError, ProcessLookupError):
        pass  # it already exited; the run's wait reports why


def run_once(args: argparse.Namespace, max_staleness: int, run_dir: Path) -> dict[str, Any]:
    overrides = [
        f"run_id=async{max_staleness}",
        f"learner.steps={args.steps}",
        f"learner.max_staleness={max_staleness}",
        f"learner.prompts_per_step={args.prompts_per_step}",
        f"learner.updates_per_step={args.updates_per_step}",
        f"learner.micro_batch_sequences={args.prompts_per_step * args.samples}",
        f"sampling.num_samples={args.samples}",
        f"sampling.max_new_tokens={args.max_new_tokens}",
        "learner.eval_every_steps=0",
        f"learner.checkpoint.every_steps={args.steps}",
        f"generator.max_tasks_in_flight={args.tasks_in_flight}",
        "local.num_generators=1",
    ]
    cluster = LocalCluster(CONFIG, run_dir, overrides)
    cpus = os.sched_getaffinity(0)
    start = time.monotonic()
    try:
        cluster.start_redis()
        learner = cluster.start_learner()
        generator = cluster.start_generator("gen-0")
        if {LEARNER_CPU, GENERATOR_CPU} <= cpus:
            pin(learner.pid, LEARNER_CPU)
            pin(generator.pid, GENERATOR_CPU)
        try:
            code = learner.wait(timeout=START_TIMEOUT_S + STEP_TIMEOUT_S * args.steps)
        except Exception as e:  # a hang: stop everything, report the logs
            raise RuntimeError(f"the learner did not finish; see {cluster.logs}") from e
        if code != 0:
            raise RuntimeError(f"the learner exited with {code}; see {cluster.logs}/learner.log")
    finally:
        cluster.stop_all()
    wall_s = time.monotonic() - start
    rows = sorted(read_metrics(run_dir), key=lambda r: int(r["step"]))  # type: ignore[call-overload]
    summary = json.loads((run_dir / "summary.json").read_text())
    times = {int(r["step"]): float(r["time"]) for r in rows}  # type: ignore[call-overload,arg-type]
    first = min(args.warmup_steps, args.steps - 1)
    s_per_step = (times[args.steps] - times[first]) / (args.steps - first)
    return {
        "s_per_step": s_per_step,
        "wasted_fraction": summary["wasted_fraction"],
        "tokens_wasted": summary["tokens_wasted"],
        "tokens_trained": summary["tokens_trained"],
        "groups_dropped_stale": summary["groups_dropped_stale"],
        "final_reward": summary["reward_mean_last_fifth"],
        "first_reward": summary["reward_mean_first_fifth"],
        "gen_s": statistics.mean(float(r["wait_s"]) for r in rows[first:]),  # type: ignore[arg-type]
        "train_s": statistics.mean(float(r["train_s"]) for r in rows[first:]),  # type: ignore[arg-type]
        "publish_s": statistics.mean(float(r["publish_s"]) for r in rows[first:]),  # type: ignore[arg-type]
        "staleness_mean": statistics.mean(float(r["staleness_mean"]) for r in rows),  # type: ignore[arg-type]
        "wall_s": wall_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of each run (S)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of s/step")
    parser.add_argument("--async-staleness", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=24)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="sync/async pairs (median)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--updates-per-step", type=int, default=1, help="optimiser updates")
    parser.add_argument(
        "--tasks-in-flight", type=int, default=4, help="prompts a generator samples at once"
    )
    parser.add_argument("--smoke", action="store_true", help="3 steps of 4 prompts each")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep both runs here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup_steps, args.prompts_per_step, args.updates_per_step = 3, 1, 4, 1
        args.repeats = 1
    base = args.run_dir or Path(tempfile.mkdtemp(prefix="lpreg-bench-async-"))
    # Pairs back to back, so a change in the machine's load reaches both sides of a pair.
    syncs, asyncs = [], []
    for i in range(args.repeats):
        syncs.append(run_once(args, 0, base / f"sync{i}"))
        asyncs.append(run_once(args, args.async_staleness, base / f"async{i}"))
    sync, async_ = syncs[0], asyncs[0]
    sync_s = statistics.median(r["s_per_step"] for r in syncs)
    async_s = statistics.median(r["s_per_step"] for r in asyncs)
    result: dict[str, Any] = {
        "steps": args.steps,
        "async_max_staleness": args.async_staleness,
        "prompts_per_step": args.prompts_per_step,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "updates_per_step": args.updates_per_step,
        "repeats": args.repeats,
        "sync_s_per_step": sync_s,
        "async_s_per_step": async_s,
        "speedup": sync_s / async_s,
        "sync_s_per_step_all": [r["s_per_step"] for r in syncs],
        "async_s_per_step_all": [r["s_per_step"] for r in asyncs],
        "speedup_all": [
            a["s_per_step"] / b["s_per_step"] for a, b in zip(syncs, asyncs, strict=True)
        ],
        "sync_wasted_fraction": max(r["wasted_fraction"] for r in syncs),
        "async_wasted_fraction": max(r["wasted_fraction"] for r in asyncs),
        "sync_final_reward": sync["final_reward"],
        "async_final_reward": async_["final_reward"],
        "sync": sync,
        "async": async_,
        "cpus_pinned": {"learner": LEARNER_CPU, "generator": GENERATOR_CPU},
        "load_average_1m": os.getloadavg()[0],
        "run_dir": str(base),
    }
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

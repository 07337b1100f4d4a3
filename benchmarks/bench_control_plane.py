"""Control plane at scale: one real learner and N generator members on this machine.

For each member count N this starts a private redis-server, a real learner
(``python -m services.cli learner``, the tiny model, gRPC with a bearer token, Gloo broadcast)
and ceil(N / members_per_host) member-host processes (benchmarks/_member_host.py), each running
lightweight members: a real ControlClient (register, heartbeats, Control stream, load reports), a
real Redis consumer, its own Gloo rank and WeightReceiver, and a stub sampler instead of a model.
The learner trains ``--steps`` steps on the stub rollouts and broadcasts every new version to
all members; then it sends Shutdown and everyone exits.

    python benchmarks/bench_control_plane.py --members 1 8 32 64 \
        --out benchmarks/results/control_plane.json

One JSON object goes to stdout (and ``--out``). Per member count:

- registration_s: all members are released at once (every host has imported and built its
  members first); from that moment to the last member's first registration returning.
- publish_to_all_loaded_s: per trained version, from the learner starting the publish (its step
  record's time minus publish_s) to the last member's load report returning; p50 / p90 / max.
- redis_commands_per_s: INFO commandstats call deltas over the measurement window (from step
  ``--warmup-steps`` to the last step), all clients together.
- learner_cpu_share: the learner process's user+system CPU time over the same window divided by
  the window (1.0 = one core busy); members_cpu_share likewise for all member hosts.
- dropped_wrongly: members (none is ever killed, so every drop is wrong) that re-registered,
  failed a join or a load, were left out of a step's publish, or did not load the final version.
- stalled: no step for ``--stall-s``, a failed publish, or the run not finishing.

``max_members_ok`` is the largest N that neither stalled nor dropped anybody. Everything this
script starts it stops itself, by PID, within bounded time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from lpreg_core.config import load_config  # noqa: E402
from services.generator.control_client import ControlClient  # noqa: E402

DEFAULT_CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
MEMBER_HOST = ROOT / "benchmarks" / "_member_host.py"
STOP_GRACE_S = 20.0
POLL_S = 0.25
# Calls one generator may hold on the learner at once (ControlConfig.max_calls_per_peer's
# description: its Control stream, a heartbeat and one other).
PEER_CALLS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_fd(path: Path) -> int:
    """A file descriptor for a child's output; the caller closes it once the child has it."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM by PID, wait, then SIGKILL: bounded in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)
    return proc.returncode


def quantiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None, "n": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "p50": round(statistics.median(ordered), 4),
        "p90": round(p90, 4),
        "max": round(ordered[-1], 4),
        "n": len(ordered),
    }


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(workdir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc)


def run_one(num_members: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"lpreg-cpbench-{num_members}-"))
    per_host = max(1, min(args.members_per_host, num_members))
    num_hosts = math.ceil(num_members / per_host)
    token = secrets.token_hex(16)
    env = {**os.environ, "LPREG_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    env.pop("LPREG_LEARNER_ADDRESS", None)
    env.pop("LPREG_REDIS_URL", None)
    grpc_port, store_port = free_port(), free_port()
    result: dict[str, Any] = {
        "members": num_members,
        "member_hosts": num_hosts,
        "members_per_host": per_host,
    }
    redis_proc = RedisProcess(workdir)
    overrides = [
        f"run_id=cpbench{num_members}",
        f"redis.url={redis_proc.url}",
        f"control.port={grpc_port}",
        f"control.learner_address=127.0.0.1:{grpc_port}",
        # The cap counts calls per peer address; here every member shares 127.0.0.1, where in a
        # cluster each generator has its own, so it is raised to what N separate peers may hold.
        f"control.max_calls_per_peer={min(4096, max(64, PEER_CALLS * num_members))}",
        "broadcast.store_host=127.0.0.1",
        f"broadcast.store_port={store_port}",
        "metrics.learner_port=0",
        "metrics.loggers=[]",
        f"learner.steps={args.steps}",
        "learner.eval_every_steps=0",
        f"learner.min_generators={num_members}",
        f"learner.min_generators_timeout_s={args.timeout_s}",
        "learner.final_publish_wait_s=30",
        f"local.run_dir={workdir / 'run'}",
    ] + list(args.set)
    set_args = [a for o in overrides for a in ("--set", o)]
    config = load_config(args.config, overrides)
    learner_log = _log_fd(workdir / "learner.log")
    learner = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "learner", str(args.config), *set_args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=learner_log,
        stderr=subprocess.STDOUT,
    )
    os.close(learner_log)  # the child holds its own copy
    hosts: list[subprocess.Popen[bytes]] = []
    observer = ControlClient(
        # One try per poll: the loop below does the waiting.
        config.control.model_copy(update={"retry_attempts": 1}),
        address=f"127.0.0.1:{grpc_port}",
        generator_id="bench-observer",
        backend="stub",
        num_workers=1,
        vocab_size=0,
        device="cpu",
        auth_token=token,
        rpc_timeout_s=5.0,
    )
    stalled_reason: str | None = None
    go: float | None = None
    window: dict[str, Any] = {}
    last_status = None
    try:
        # The learner must be serving before members start, so registration_s measures the
        # control plane and not the learner's start-up.
        t_learner = time.monotonic()
        while True:
            try:
                observer.status()
                break
            except Exception:
                if learner.poll() is not None or time.monotonic() - t_learner > args.timeout_s:
                    raise RuntimeError(
                        f"learner did not come up; see {workdir / 'learner.log'}"
                    ) from None
                time.sleep(0.2)
        result["learner_start_s"] = round(time.monotonic() - t_learner, 2)
        launch = time.time()
        for h in range(num_hosts):
            first = h * per_host
            count = min(per_host, num_members - first)
            hosts.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(MEMBER_HOST),
                        str(args.config),
                        *set_args,
                        "--members",
                        str(count),
                        "--first-index",
                        str(first),
                        "--id-prefix",
                        "gen",
                        "--out",
                        str(workdir / f"host-{h}.json"),
                        "--go-file",
                        str(workdir / "go"),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=(host_log := _log_fd(workdir / f"host-{h}.log")),
                    stderr=subprocess.STDOUT,
                )
            )
            os.close(host_log)
        deadline = time.monotonic() + args.timeout_s
        ready = [workdir / f"host-{h}.json.ready" for h in range(num_hosts)]
        while not all(p.exists() for p in ready):
            if time.monotonic() > deadline or any(p.poll() is not None for p in hosts):
                raise RuntimeError(f"member hosts did not start; see {workdir}/host-*.log")
            time.sleep(0.05)
        result["launch_to_hosts_ready_s"] = round(time.time() - launch, 2)
        go = time.time()
        (workdir / "go").write_text(str(go))
        last_step, last_progress = -1, time.monotonic()
        while learner.poll() is None:
            now = time.monotonic()
            if now > deadline:
                stalled_reason = f"run did not finish within {args.timeout_s}s"
                break
            try:
                status = observer.status()
            except Exception:
                time.sleep(POLL_S)
                continue
            last_status = status
            if status.step != last_step:
                last_step, last_progress = status.step, now
            elif status.step > 0 and now - last_progress > args.stall_s:
                stalled_reason = f"no step for {args.stall_s}s after step {status.step}"
                break
            if "start" not in window and status.step >= args.warmup_steps:
                window["start"] = _snapshot(learner.pid, hosts, redis_proc.client)
                window["start_step"] = status.step
            if "start" in window and "end" not in window and status.step > window["start_step"]:
                # Every poll moves the end; a learner that exits right after its last step
                # still leaves a window ending at the last step seen.
                window["last"] = _snapshot(learner.pid, hosts, redis_proc.client)
                window["last_step"] = status.step
                if status.step >= args.steps:
                    window["end"], window["end_step"] = window["last"], status.step
            time.sleep(POLL_S)
        if stalled_reason is not None:
            stop_process(learner)
        else:
            try:
                learner.wait(timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                stalled_reason = "learner did not exit after its last step"
                stop_process(learner)
        # Members exit on the learner's Shutdown; anything left is stopped by PID.
        host_deadline = time.monotonic() + STOP_GRACE_S
        for proc in hosts:
            try:
                proc.wait(timeout=max(0.1, host_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc)
    finally:
        observer.close()
        for proc in hosts:
            stop_process(proc)
        if learner.poll() is None:
            stop_process(learner)
        redis_proc.stop()

    result.update(
        _analyse(num_members, workdir, num_hosts, go, window, last_status, stalled_reason, args)
    )
    result["learner_exit_code"] = learner.returncode
    if args.keep:
        result["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _snapshot(
    learner_pid: int, hosts: list[subprocess.Popen[bytes]], client: redis.Redis
) -> dict[str, Any]:
    return {
        "t": time.monotonic(),
        "learner_cpu_s": cpu_seconds(learner_pid),
        "hosts_cpu_s": sum(cpu_seconds(p.pid) or 0.0 for p in hosts),
        "redis": redis_calls(client),
        "loadavg": os.getloadavg()[0],
    }


def _analyse(
    num_members: int,
    workdir: Path,
    num_hosts: int,
    go: float | None,
    window: dict[str, Any],
    last_status: Any,
    stalled_reason: str | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    members: list[dict[str, Any]] = []
    max_rss = []
    for h in range(num_hosts):
        path = workdir / f"host-{h}.json"
        if path.exists():
            host = json.loads(path.read_text())
            members.extend(host["members"])
            max_rss.append(host["max_rss_bytes"])
    out["member_records"] = len(members)
    out["member_host_max_rss_bytes"] = max(max_rss) if max_rss else None

    records = []
    metrics_file = workdir / "run" / "metrics.jsonl"
    if metrics_file.exists():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    steps = [r for r in records if "publish_s" in r]
    summary_file = workdir / "run" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    final_version = summary.get("policy_version")
    out["steps"] = len(steps)
    out["final_version"] = final_version

    first_calls = [m["register_calls"][0] for m in members if m["register_calls"]]
    if len(first_calls) == num_members and go is not None:
        out["registration_s"] = round(max(c[1] for c in first_calls) - go, 4)
        out["register_call_s"] = quantiles([c[1] - c[0] for c in first_calls])
    else:
        out["registration_s"] = None

    # Joining the first epoch and loading the starting weights, after the last registration.
    v0_loaded = [
        min(ld["reported"] for ld in m["loads"] if ld["version"] == 0 and not ld["error"])
        for m in members
        if any(ld["version"] == 0 and not ld["error"] for ld in m["loads"])
    ]
    if first_calls and len(v0_loaded) == num_members:
        out["registered_to_all_loaded_v0_s"] = round(
            max(v0_loaded) - max(c[1] for c in first_calls), 4
        )

    loaded_at: dict[int, list[float]] = {}
    for m in members:
        for ld in m["loads"]:
            if not ld["error"]:
                loaded_at.setdefault(ld["version"], []).append(ld["reported"])
    publish_to_loaded = []
    short_publishes = 0
    for r in steps:
        reports = loaded_at.get(r["version"], [])
        if len(reports) < num_members:
            short_publishes += 1
            continue
        publish_to_loaded.append(max(reports) - (r["time"] - r["publish_s"]))
    out["publish_to_all_loaded_s"] = quantiles(publish_to_loaded)
    out["learner_publish_s"] = quantiles([r["publish_s"] for r in steps])
    out["learner_train_s"] = quantiles([r["train_s"] for r in steps])
    out["publishes_missing_a_member"] = short_publishes
    out["broadcast_bytes"] = max(
        (ld["bytes"] for m in members for ld in m["loads"] if not ld["error"]), default=None
    )

    if "start" in window and "last" in window:
        a, b = window["start"], window["last"]
        span = b["t"] - a["t"]
        calls = {k: b["redis"].get(k, 0) - a["redis"].get(k, 0) for k in b["redis"]}
        top = sorted(((v, k) for k, v in calls.items() if v), reverse=True)[:8]
        out["window_s"] = round(span, 3)
        out["window_steps"] = window["last_step"] - window["start_step"]
        out["steps_per_s"] = round(out["window_steps"] / span, 3) if span > 0 else None
        out["redis_commands_per_s"] = round(sum(calls.values()) / span, 1) if span > 0 else None
        out["redis_top_commands_per_s"] = {k: round(v / span, 1) for v, k in top}
        if a["learner_cpu_s"] is not None and b["learner_cpu_s"] is not None:
            out["learner_cpu_share"] = round((b["learner_cpu_s"] - a["learner_cpu_s"]) / span, 3)
        out["members_cpu_share"] = round((b["hosts_cpu_s"] - a["hosts_cpu_s"]) / span, 3)
        out["loadavg_1m"] = [round(a["loadavg"], 2), round(b["loadavg"], 2)]
    else:
        out["redis_commands_per_s"] = None
        out["learner_cpu_share"] = None

    dropped: dict[str, list[str]] = {}

    def drop(member_id: str, why: str) -> None:
        dropped.setdefault(member_id, []).append(why)

    for m in members:
        if m.get("registrations", 0) > 1:
            drop(m["id"], f"registered {m['registrations']} times")
        if m.get("control_error"):
            drop(m["id"], m["control_error"])
        for j in m["joins"]:
            if j["error"]:
                drop(m["id"], f"join epoch {j['epoch']}: {j['error']}")
        for ld in m["loads"]:
            if ld["error"] or ld["accepted"] is False:
                drop(m["id"], f"load v{ld['version']}: {ld['error'] or 'not accepted'}")
        best = max((ld["version"] for ld in m["loads"] if not ld["error"]), default=None)
        if final_version is not None and (best is None or best < final_version):
            drop(m["id"], f"loaded v{best}, final v{final_version}")
    missing = num_members - len(members)
    left_out = num_members - min((r["members"] for r in steps), default=num_members)
    out["dropped_wrongly"] = max(len(dropped) + missing, left_out)
    out["dropped_reasons"] = {k: v[:3] for k, v in sorted(dropped.items())[:8]}
    out["loaded_final_version"] = sum(
        1
        for m in members
        if final_version is not None
        and any(ld["version"] == final_version and not ld["error"] for ld in m["loads"])
    )
    out["group_epochs"] = last_status.epoch if last_status is not None else None
    out["groups_published"] = sum(m["groups_published"] for m in members)
    out["groups_dead_lettered"] = summary.get("groups_dead_lettered")
    out["groups_dropped_stale"] = summary.get("groups_dropped_stale")
    if stalled_reason is None and summary.get("completed") is not True:
        stalled_reason = f"learner did not complete: {summary.get('reason', 'no summary')}"
    if stalled_reason is None and any(not r.get("publish_ok", True) for r in steps):
        stalled_reason = "a publish failed"
    out["stalled"] = stalled_reason is not None
    out["stall_reason"] = stalled_reason
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--members-per-host", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--stall-s", type=float, default=90.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each run's directory and logs")
    args = parser.parse_args(argv)
    if args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be below --steps")

    started = time.time()
    results = {}
    for n in args.members:
        print(f"[bench_control_plane] {n} members ...", file=sys.stderr, flush=True)
        try:
            results[str(n)] = run_one(n, args)
        except RuntimeError as e:  # one count failing to start must not lose the others
            results[str(n)] = {"members": n, "stalled": True, "stall_reason": str(e)}
            results[str(n)]["dropped_wrongly"] = None
    ok = [
        n
        for n in args.members
        if not results[str(n)]["stalled"] and results[str(n)]["dropped_wrongly"] == 0
    ]
    report = {
        "benchmark": "control_plane",
        "config": str(args.config),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "members_per_host": args.members_per_host,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "results": results,
        "max_members_ok": max(ok) if ok else 0,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

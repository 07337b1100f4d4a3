"""Attacks on a real local deployment (redis-server, learner, two generators, gRPC, Gloo); prints
one JSON object with, per attack, whether the deployment ``held`` and why.

    python benchmarks/redteam.py [--chaos-steps 100] [--chaos-kills 10] [--chaos-tail-steps 100]
                                 [--out redteam.json]

Attacks (numbered as in the hostile-input review):
  1  rendezvous: a process without credentials dials the learner's TCPStore, forges rank
     claims and aborted keys for coming epochs, and reads what the live epoch stores.
  2  poison entries: a group with token versions 2**63; a prompt task at temperature 1e-7; a
     48 KB group of 2 x 4,000 tokens; Register with num_workers 2**32 - 1 and 1e6.
  3  forged groups: reward 3e38, 2,000 completions, log-prob -1e30, a never-issued task id,
     versions 100 ahead of the learner.
  5  redis-server stopped for 20 s mid-run, then started again on its port and data.
  6  600 half-open gRPC calls without a token while training runs.
Then the chaos schedule (benchmarks/chaos.py's faults) with --chaos-kills learner kill -9 /
--resume cycles spread over --chaos-steps steps, and --chaos-tail-steps more steps without faults.
``wasted_fraction``: generated tokens never trained over all generated ones in the last 100 steps
(goal <= 0.05: restarts leave no lasting waste); ``wasted_fraction_during_faults`` and
``wasted_fraction_run`` give the same ratio over the faulted steps and over the whole run.

An attack "held" when the deployment refused it (dead-lettered, refused, or rode through) and the
run still finished with every service up; the reason says what was observed either way.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import redis as redis_lib  # noqa: E402

from lpreg_core.rollout import encode_group, encode_task  # noqa: E402
from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc, rollout_pb2  # noqa: E402
from services.common.auth import bearer_metadata  # noqa: E402
from services.local.cluster import (  # noqa: E402
    TERMINATE_GRACE_S,
    LocalCluster,
    read_metrics,
    wait_for_step,
)

CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
RUN_ID = "redteam"
NUM_SAMPLES = 4
MAX_NEW_TOKENS = 8
STEP_TIMEOUT_S = 180.0
NUM_HALF_OPEN = 600
HALF_OPEN_HOLD_S = 10.0
OUTAGE_S = 20.0
ATTACK_RUN_STEPS = 400
FAST = [
    f"run_id={RUN_ID}",
    f"sampling.num_samples={NUM_SAMPLES}",
    f"sampling.max_new_tokens={MAX_NEW_TOKENS}",
    "learner.prompts_per_step=4",
    "learner.eval_every_steps=0",
    "learner.checkpoint.every_steps=2",
    "learner.publish_timeout_s=10",
    "broadcast.join_timeout_s=5",
    "generator.heartbeat_interval_s=0.5",
    "generator.heartbeat_ttl_s=3",
    "redis.claim_idle_ms=2000",
]


def log(message: str) -> None:
    print(f"redteam: {message}", file=sys.stderr, flush=True)


def result(held: bool, reason: str, **extra: Any) -> dict[str, Any]:
    return {"held": held, "reason": reason, **extra}


# -- a deployment ---------------------------------------------------------------------------------


class Deployment:
    """A LocalCluster with two generators and a raw Redis client for the attacker."""

    def __init__(self, run_dir: Path, overrides: list[str]) -> None:
        self.cluster = LocalCluster(CONFIG, run_dir, [*FAST, *overrides])
        self.redis: redis_lib.Redis | None = None

    def start(self) -> None:
        c = self.cluster
        url = c.start_redis()
        self.redis = redis_lib.Redis.from_url(url)
        c.start_learner()
        for gid in ("gen-0", "gen-1"):
            c.start_generator(gid)

    @property
    def token(self) -> str:
        return self.cluster.env["LPREG_AUTH_TOKEN"]

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.cluster.grpc_port}"

    def key(self, name: str) -> str:
        return f"lpreg:{RUN_ID}:{name}"

    def r(self) -> redis_lib.Redis:
        assert self.redis is not None
        return self.redis

    def version(self) -> int:
        raw = self.r().get(self.key("version"))
        return int(raw) if raw is not None else 0

    def issued(self) -> dict[str, tuple[int, int, int, int]]:
        """Issued, outstanding task id -> (data_index, num_samples, max_new_tokens, version)."""
        raw = self.r().hgetall(self.key("issued"))
        out = {}
        for k, v in raw.items():
            a, b, c, d = (int(x) for x in v.decode().split(","))
            out[k.decode()] = (a, b, c, d)
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        out = []
        for _id, fields in self.r().xrange(self.key("dlq")):
            f = {k.decode(): v for k, v in fields.items()}
            entry = {
                "source": f.get("source", b"").decode(),
                "reason": f.get("reason", b"").decode(),
                "detail": f.get("detail", b"").decode(errors="replace")[:200],
                "payload": f.get("payload", b""),
            }
            out.append(entry)
        return out

    def finish(self, timeout_s: float) -> tuple[int | None, dict[str, Any]]:
        c = self.cluster
        assert c.learner is not None
        try:
            code = c.learner.wait(timeout=timeout_s)
        except Exception:
            code = None
        path = c.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        return code, summary

    def generator_codes(self, timeout_s: float) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for gid, proc in self.cluster.generators.items():
            try:
                codes[gid] = proc.wait(timeout=timeout_s)
            except Exception:
                codes[gid] = None
        return codes

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.close()
        self.cluster.stop_all()


def forged_group(
    task_id: str,
    issued: tuple[int, int, int, int] | None,
    version: int,
    *,
    num_completions: int = NUM_SAMPLES,
    num_tokens: int = 4,
    **completion_fields: Any,
) -> rollout_pb2.RolloutGroup:
    """A group that is valid except for what ``completion_fields`` (or the sizes) break."""
    data_index, _, _, issue_version = issued if issued is not None else (0, 0, 0, version)
    group = rollout_pb2.RolloutGroup(
        run_id=RUN_ID,
        rollout_id=f"forged-{uuid.uuid4().hex}",
        task_id=task_id,
        prompt_id="forged",
        generator_id="forger",
        data_index=data_index,
        issue_version=issue_version,
        prompt_token_ids=[1, 2, 3],
        created_at=time.time(),
        vocab_size=VOCAB_SIZE,
    )
    for i in range(num_completions):
        fields: dict[str, Any] = dict(
            token_ids=[4] * num_tokens,
            logprobs=[-1.0] * num_tokens,
            versions=[version] * num_tokens,
            reward=float(i % 2),
            finish_reason=rollout_pb2.FINISH_REASON_STOP,
        )
        fields.update(completion_fields)
        group.completions.append(rollout_pb2.Completion(**fields))
    return group


def _vocab_size() -> int:
    return int(
        json.loads((ROOT / "examples" / "tiny" / "model" / "config.json").read_text())["vocab_size"]
    )


VOCAB_SIZE = _vocab_size()


# -- attack 1: the rendezvous -------------------------------------------------------------------


def attack_rendezvous(d: Deployment) -> dict[str, Any]:
    """Dial the learner's TCPStore with no credentials, as the reproduced attack did: claim ranks
    and announce joins for this and the next epochs, write ``aborted`` for the next 50 epochs,
    and read what the live epoch stores. The store is a plain socket, so the writes land; the
    rendezvous holds when none of it lets the outsider read the group's values, and training
    (new epochs included) goes on as if it had not happened."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(
            "127.0.0.1", d.cluster.store_port, is_master=False, timeout=timedelta(seconds=5),
            wait_for_workers=False,
        )  # fmt: skip
    except Exception as e:
        return result(True, f"connection refused without credentials: {type(e).__name__}: {e}")
    readable: list[str] = []
    for key in store.list_keys() if hasattr(store, "list_keys") else []:
        try:
            value = store.get(key)
        except Exception:  # noqa: S112 - a key gone between list and get
            continue
        if value.startswith(b"{") or value.isdigit():  # a plain value the outsider could use
            readable.append(key)
    for epoch in range(1, 51):
        for prefix in (f"epoch/{epoch}", f"epoch/{epoch}/pg"):
            store.set(f"{prefix}/aborted", b"redteam: stop training")
            store.set(f"{prefix}/joined/1", b"1")
            store.set(f"{prefix}/members", b"2")
    rows = read_metrics(d.cluster.run_dir)
    before = max((int(r["step"]) for r in rows), default=0)
    # Force new epochs while the forged keys sit in the store: restart a generator.
    restart_generator(d.cluster, "gen-0")
    deadline = time.monotonic() + STEP_TIMEOUT_S
    after = before
    while time.monotonic() < deadline and after < before + 3:
        time.sleep(1.0)
        rows = read_metrics(d.cluster.run_dir)
        after = max((int(r["step"]) for r in rows), default=before)
    # The restarted generator is serving again (a fresh heartbeat) before the next attack, which
    # measures heartbeat ages.
    time.sleep(3.5)  # the killed process's heartbeat key expires (heartbeat_ttl_s=3)
    while time.monotonic() < deadline and not d.r().exists(d.key("gen:gen-0")):
        time.sleep(0.5)
    published = [r for r in rows if int(r["step"]) > before]
    ok = bool(published) and all(r.get("publish_ok", False) for r in published[-2:])
    if readable or after < before + 3 or not ok:
        return result(
            False,
            f"steps {before} -> {after} after the forged keys; plain values readable: "
            f"{readable[:5]}; recent publishes ok: {ok}",
        )
    return result(
        True,
        f"forged joins, members and aborted keys for 50 epochs changed nothing: steps {before} -> "
        f"{after} across a generator restart (new epochs), publishes ok; no value of the live "
        "epoch was readable without the secret (sealed)",
    )


# -- attack 2 and 3: entries through Redis ------------------------------------------------------


def inject_entries(d: Deployment) -> dict[str, dict[str, Any]]:
    """XADD the poison and forged entries; returns attack name -> what was injected."""
    r = d.r()
    version = d.version()
    issued = d.issued()
    # Each forged group takes an issued task whose real group is not in the rollouts stream yet
    # (nor trained: trained groups stay in the stream until the checkpoint acks them), so the
    # learner reads the forgery first and only what it breaks is wrong.
    published = set()
    for _id, fields in r.xrange(d.key("rollouts")):
        g = rollout_pb2.RolloutGroup()
        g.ParseFromString(fields.get(b"data", b""))
        published.add(g.task_id)
    tasks = iter(sorted(set(issued) - published))

    def next_task() -> tuple[str, tuple[int, int, int, int] | None]:
        task_id = next(tasks, None)
        if task_id is None:
            return f"unissued-{uuid.uuid4().hex}", None
        return task_id, issued[task_id]

    plans: dict[str, Callable[[str, Any], rollout_pb2.RolloutGroup]] = {
        "3_version_100_ahead": lambda t, i: forged_group(
            t, i, version, versions=[version + 100] * 4
        ),
        "2_version_2_63": lambda t, i: forged_group(t, i, version, versions=[2**63] * 4),
        "2_group_2x4000_tokens": lambda t, i: forged_group(
            t, i, version, num_completions=2, num_tokens=4000
        ),
        "3_reward_3e38": lambda t, i: forged_group(t, i, version, reward=3e38),
        "3_2000_completions": lambda t, i: forged_group(t, i, version, num_completions=2000),
        "3_logprob_minus_1e30": lambda t, i: forged_group(
            t, i, version, logprobs=[-1.0, -1e30, -1.0, -1.0]
        ),
    }
    injected: dict[str, dict[str, Any]] = {}
    for name, make in plans.items():
        task_id, info = next_task()
        group = make(task_id, info)
        data = encode_group(group)
        r.xadd(d.key("rollouts"), {b"data": data})
        injected[name] = {"rollout_id": group.rollout_id, "task_issued": info is not None,
                          "bytes": len(data)}  # fmt: skip
    never = forged_group(f"never-issued-{uuid.uuid4().hex}", None, version)
    r.xadd(d.key("rollouts"), {b"data": encode_group(never)})
    injected["3_never_issued_task"] = {"rollout_id": never.rollout_id, "task_issued": False}
    poison_task = rollout_pb2.PromptTask(
        run_id=RUN_ID,
        task_id=f"poison-{uuid.uuid4().hex}",
        prompt_id="poison",
        prompt="1+1=",
        answer="2",
        num_samples=NUM_SAMPLES,
        issue_version=version,
        issued_at=time.time(),
        temperature=1e-7,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    r.xadd(d.key("prompts"), {b"data": encode_task(poison_task)})
    injected["2_task_temperature_1e-7"] = {"task_id": poison_task.task_id}
    return injected


def judge_entries(
    d: Deployment,
    injected: dict[str, dict[str, Any]],
    learner_code: int | None,
    generator_codes: dict[str, int | None],
    summary: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    letters = d.dead_letters()
    by_rollout: dict[str, dict[str, Any]] = {}
    by_task: dict[str, dict[str, Any]] = {}
    for entry in letters:
        payload = entry["payload"]
        if entry["source"] == "rollouts":
            g = rollout_pb2.RolloutGroup()
            try:
                g.ParseFromString(payload)
            except Exception:
                continue
            by_rollout[g.rollout_id] = entry
        else:
            t = rollout_pb2.PromptTask()
            try:
                t.ParseFromString(payload)
            except Exception:
                continue
            by_task[t.task_id] = entry
    rows = read_metrics(d.cluster.run_dir)
    non_finite = [
        (r.get("step"), k)
        for r in rows
        for k, v in r.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    pending = d.r().xpending(d.key("rollouts"), "learner")["pending"]
    alive_ok = learner_code == 0 and all(c == 0 for c in generator_codes.values())
    services = f"learner exit {learner_code}, generators {generator_codes}"
    out: dict[str, dict[str, Any]] = {}
    for name, info in injected.items():
        entry = (
            by_task.get(info["task_id"])
            if "task_id" in info
            else by_rollout.get(info["rollout_id"])
        )
        if entry is None:
            out[name] = result(
                False,
                "not in the dead-letter stream (trained, acked as a duplicate of its real group, "
                f"or lost); {services}",
            )
            continue
        held = alive_ok and not non_finite
        why = f"dead-lettered ({entry['reason']}: {entry['detail']}); {services}"
        if non_finite:
            why += f"; non-finite metrics {non_finite[:3]}"
        if info.get("task_issued") is False and name != "3_never_issued_task":
            why += (
                "; no issued task without a published group was free when it was injected, so "
                "it carried an unissued task id and only the never-issued check was exercised"
            )
        out[name] = result(held, why)
    out["2_poison_not_left_pending"] = result(
        pending == 0 and alive_ok,
        f"{pending} rollout entries pending at the end (a resume replays only these); {services}",
    )
    out["accounting"] = result(
        summary.get("prompts_unaccounted") == 0,
        f"prompts_unaccounted={summary.get('prompts_unaccounted')}, "
        f"groups_dead_lettered={summary.get('groups_dead_lettered')}, "
        f"rollouts_in_dlq={summary.get('rollouts_in_dlq')}",
    )
    return out


# -- attack 2: Register bounds ---------------------------------------------------------------------


def attack_register(d: Deployment, num_workers: int) -> dict[str, Any]:
    channel = grpc.insecure_channel(d.grpc_address)
    stub = control_pb2_grpc.LearnerControlStub(channel)
    request = control_pb2.RegisterRequest(
        generator_id=f"evil-{num_workers}", backend="hf", num_workers=num_workers,
        vocab_size=VOCAB_SIZE, device="cpu", run_id=RUN_ID,
    )  # fmt: skip
    try:
        stub.Register(request, metadata=bearer_metadata(d.token), timeout=20)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
    try:
        stub.GetStatus(control_pb2.StatusRequest(), metadata=bearer_metadata(d.token), timeout=20)
        learner_up = True
    except grpc.RpcError:
        learner_up = False
    channel.close()
    held = code is grpc.StatusCode.INVALID_ARGUMENT and learner_up
    return result(
        held, f"Register answered {code.name}; learner answering afterwards: {learner_up}"
    )


# -- attack 6: half-open calls ------------------------------------------------------------------------


def attack_half_open(d: Deployment) -> dict[str, Any]:
    """Hold NUM_HALF_OPEN calls without a token and without a body while training runs; the
    generators must keep heartbeating and the learner keep stepping."""
    channel = grpc.insecure_channel(d.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait()
        yield from ()

    method = channel.stream_unary(
        "/lpreg.v1.LearnerControl/Register",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    steps_before = max((int(r["step"]) for r in read_metrics(d.cluster.run_dir)), default=0)
    futures = [method.future(never()) for _ in range(NUM_HALF_OPEN)]
    legit = grpc.insecure_channel(d.grpc_address)
    stub = control_pb2_grpc.LearnerControlStub(legit)
    worst_age = 0.0
    failures: list[str] = []
    deadline = time.monotonic() + HALF_OPEN_HOLD_S
    while time.monotonic() < deadline:
        try:
            status = stub.GetStatus(
                control_pb2.StatusRequest(), metadata=bearer_metadata(d.token), timeout=5
            )
            ages = [
                g.last_heartbeat_age_s
                for g in status.generators
                if g.generator_id.startswith("gen-")
            ]
            worst_age = max([worst_age, *ages])
        except grpc.RpcError as e:
            failures.append(e.code().name)  # type: ignore[attr-defined]
        time.sleep(0.5)
    steps_after = max((int(r["step"]) for r in read_metrics(d.cluster.run_dir)), default=0)
    codes = [f.code().name if f.done() else "OPEN" for f in futures]  # type: ignore[attr-defined]
    counts = {c: codes.count(c) for c in set(codes)}
    for f in futures:
        f.cancel()
    release.set()
    channel.close()
    legit.close()
    held = not failures and worst_age < 3.0 and steps_after > steps_before
    return result(
        held,
        f"{NUM_HALF_OPEN} half-open calls -> {counts}; legitimate GetStatus failures {failures}; "
        f"worst generator heartbeat age {worst_age:.2f}s (ttl 3s); learner steps "
        f"{steps_before} -> {steps_after} during {HALF_OPEN_HOLD_S:.0f}s",
    )


# -- the runs -------------------------------------------------------------------------------------------


def run_attacks(base: Path) -> dict[str, Any]:
    # Long enough that the learner is still training when the last attack ends.
    d = Deployment(base / "attacks", [f"learner.steps={ATTACK_RUN_STEPS}"])
    out: dict[str, Any] = {}

    def attack(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        learner = d.cluster.learner
        if learner is None or learner.poll() is not None:
            out[name] = result(False, "not tried: the learner had already exited")
            return
        log(name)
        out[name] = fn()

    try:
        d.start()
        wait_for_step(d.cluster, 1, STEP_TIMEOUT_S)
        attack("1_rendezvous_without_credentials", lambda: attack_rendezvous(d))
        log("attacks 2 and 3: poison and forged entries")
        injected = inject_entries(d)
        attack("2_register_num_workers_2_32_minus_1", lambda: attack_register(d, 2**32 - 1))
        attack("2_register_num_workers_1e6", lambda: attack_register(d, 1_000_000))
        attack("6_half_open_calls", lambda: attack_half_open(d))
        code, summary = d.finish(STEP_TIMEOUT_S * 4)
        gens = d.generator_codes(60)
        out.update(judge_entries(d, injected, code, gens, summary))
        if out["2_register_num_workers_1e6"]["held"]:
            out["2_register_num_workers_1e6"]["reason"] += (
                f"; the run finished afterwards (learner exit {code}, {summary.get('steps')} "
                "steps): no join waited for phantom ranks"
            )
            out["2_register_num_workers_1e6"]["held"] = code == 0
    finally:
        d.stop()
    return out


def run_outage(base: Path) -> dict[str, Any]:
    steps = 6
    d = Deployment(base / "outage", [f"learner.steps={steps}"])
    try:
        d.start()
        wait_for_step(d.cluster, 2, STEP_TIMEOUT_S)
        c = d.cluster
        assert c.redis is not None
        log(f"attack 5: redis-server stopped for {OUTAGE_S:.0f}s")
        c.redis.terminate()
        c.redis.wait(timeout=TERMINATE_GRACE_S)
        time.sleep(OUTAGE_S)
        exited = {n: p.returncode for n, p in c.all_processes() if p.poll() is not None}
        exited.pop("redis-server", None)
        c.start_redis()
        code, summary = d.finish(STEP_TIMEOUT_S * 3)
        gens = d.generator_codes(60)
    finally:
        d.stop()
    held = (
        not exited
        and code == 0
        and all(g == 0 for g in gens.values())
        and summary.get("steps") == steps
        and summary.get("prompts_unaccounted") == 0
    )
    return result(
        held,
        f"exited during the outage: {exited or 'none'}; learner exit {code}, generators {gens}; "
        f"steps {summary.get('steps')}/{steps}, prompts_unaccounted "
        f"{summary.get('prompts_unaccounted')}",
    )


def window_waste(rows: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    """Tokens trained and wasted in steps first..last (inclusive), from the learner's running
    totals; a step logged twice (replayed after a resume) counts as its last record."""
    by_step = {int(r["step"]): r for r in rows if "tokens_wasted_total" in r}
    if last not in by_step or (first > 1 and first - 1 not in by_step):
        return {"steps": [first, last], "wasted_fraction": None, "why": "steps not logged"}

    def totals(step: int) -> tuple[int, int]:
        if step < 1:
            return 0, 0
        r = by_step[step]
        return int(r["tokens_trained_total"]), int(r["tokens_wasted_total"])

    t1, w1 = totals(last)
    t0, w0 = totals(first - 1)
    trained, wasted = t1 - t0, w1 - w0
    return {
        "steps": [first, last],
        "tokens_trained": trained,
        "tokens_wasted": wasted,
        "wasted_fraction": round(wasted / max(1, trained + wasted), 4),
    }


def run_chaos(base: Path, steps: int, kills: int, tail: int) -> dict[str, Any]:
    """chaos.py's faults (generator kills, a new generator, a Redis restart) plus ``kills``
    learner kill -9 / --resume cycles spread over ``steps`` steps, then ``tail`` steps without
    faults."""
    total = steps + tail
    d = Deployment(
        base / "chaos",
        [
            f"learner.steps={total}",
            "learner.prompts_per_step=4",
            "learner.checkpoint.every_steps=3",
        ],
    )
    c = d.cluster
    schedule: list[tuple[int, str, Callable[[], None]]] = [
        (max(2, steps // 10), "kill -9 gen-0, restart", lambda: restart_generator(c, "gen-0")),
        (max(3, steps // 6), "add gen-2", lambda: c.start_generator("gen-2")),
        (max(5, steps // 4), "kill -9 gen-1, restart", lambda: restart_generator(c, "gen-1")),
        (max(9, steps * 3 // 5), "restart redis-server", c.restart_redis),
    ]
    for i in range(kills):
        at = max(4, (i + 1) * steps // (kills + 1))
        schedule.append((at, f"kill -9 learner, --resume ({i + 1})", lambda: restart_learner(c)))
    schedule.sort(key=lambda s: s[0])
    events = []
    start = time.monotonic()
    stall: dict[str, Any] | None = None
    code: int | None = None
    summary: dict[str, Any] = {}
    try:
        d.start()
        for step, what, action in schedule:
            wait_for_step(c, step, STEP_TIMEOUT_S)
            action()
            events.append({"after_step": step, "fault": what})
            log(f"chaos: after step {step}: {what}")
        code, summary = d.finish(STEP_TIMEOUT_S + 10 * total)
    except (TimeoutError, RuntimeError) as e:
        log(f"chaos: stalled: {e}")
        try:
            stall = {"error": str(e), **diagnose_stall(d)}
        except Exception as diag_error:  # Redis itself may be what broke
            stall = {"error": str(e), "diagnosis_failed": repr(diag_error)}
    finally:
        d.stop()
    rows = read_metrics(c.run_dir)
    last = window_waste(rows, max(1, total - 99), total)
    return {
        "steps": total,
        "faulted_steps": steps,
        "tail_steps": tail,
        "learner_kills": kills,
        "learner_exit": code,
        "steps_completed": summary.get("steps"),
        "prompts_unaccounted": summary.get("prompts_unaccounted"),
        "tokens_trained": summary.get("tokens_trained"),
        "tokens_wasted": summary.get("tokens_wasted"),
        "wasted_fraction": last["wasted_fraction"],
        "wasted_fraction_window": last,
        "wasted_fraction_goal": 0.05,
        "wasted_fraction_during_faults": window_waste(rows, 1, steps)["wasted_fraction"],
        # The learner's counters survive resumes (checkpoint + ledger): the whole run.
        "wasted_fraction_run": summary.get("wasted_fraction"),
        "held": bool(
            code == 0
            and summary.get("prompts_unaccounted") == 0
            and last["wasted_fraction"] is not None
            and last["wasted_fraction"] <= 0.05
        ),
        "faults": events,
        "stall": stall,
        "wall_s": round(time.monotonic() - start, 1),
    }


def diagnose_stall(d: Deployment) -> dict[str, Any]:
    """What a stalled run's Redis and newest checkpoint say: issued tasks admission still counts
    as outstanding although the checkpoint has them trained hold slots no task will free."""
    issued = d.issued()
    r = d.r()
    checkpoints = d.cluster.run_dir / "checkpoints"
    trained: set[str] = set()
    latest = checkpoints / "latest"
    if latest.exists():
        state = checkpoints / latest.read_text().strip() / "state.json"
        if state.exists():
            trained = set(json.loads(state.read_text()).get("trained_tasks", []))

    def pending(stream: str, group: str) -> int:
        return int(r.xpending(d.key(stream), group)["pending"])

    return {
        "issued_tasks_outstanding": len(issued),
        "admission_limit": 2 * 4,  # (max_staleness + 1) * prompts_per_step
        "issued_tasks_already_trained_per_checkpoint": len(set(issued) & trained),
        "prompts_stream": {
            "length": r.xlen(d.key("prompts")),
            "pending": pending("prompts", "generators"),
        },
        "rollouts_stream": {
            "length": r.xlen(d.key("rollouts")),
            "pending": pending("rollouts", "learner"),
        },
    }


def guarded(
    what: str, run: Callable[[], dict[str, Any]], per_attack: bool = False
) -> dict[str, Any]:
    """``run()``, or a result that says it failed (a run that breaks is not an attack held)."""
    try:
        return run()
    except Exception as e:
        log(f"{what} failed: {type(e).__name__}: {e}")
        failed = result(False, f"{what} failed: {type(e).__name__}: {e}")
        return {"run": failed} if per_attack else failed


def restart_generator(c: LocalCluster, gid: str) -> None:
    c.kill(c.generators[gid], signal.SIGKILL)
    c.start_generator(gid)


def restart_learner(c: LocalCluster) -> None:
    c.kill(c.learner, signal.SIGKILL)
    c.start_learner(resume=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chaos-steps", type=int, default=100, help="steps of the chaos run")
    parser.add_argument("--chaos-kills", type=int, default=10, help="learner kill/resume cycles")
    parser.add_argument(
        "--chaos-tail-steps", type=int, default=100, help="steps after the last fault"
    )
    parser.add_argument("--skip-chaos", action="store_true", help="only the attacks")
    parser.add_argument("--skip-attacks", action="store_true", help="only the chaos run")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.chaos_steps < 12:
        parser.error("--chaos-steps must be >= 12 to fit the fault schedule")
    base = args.run_dir or Path(tempfile.mkdtemp(prefix="lpreg-redteam-"))
    start = time.monotonic()
    attacks: dict[str, Any] = {}
    if not args.skip_attacks:
        attacks = guarded("attack run", lambda: run_attacks(base), per_attack=True)
        attacks["5_redis_stopped_20s"] = guarded("outage run", lambda: run_outage(base))
    report: dict[str, Any] = {"attacks": attacks}
    if not args.skip_chaos:
        log(
            f"chaos: {args.chaos_steps} steps with {args.chaos_kills} learner kills, then "
            f"{args.chaos_tail_steps} steps"
        )
        report["chaos"] = guarded(
            "chaos run",
            lambda: run_chaos(base, args.chaos_steps, args.chaos_kills, args.chaos_tail_steps),
        )
    report["all_held"] = (
        all(a["held"] for a in attacks.values()) and report.get("chaos", {"held": True})["held"]
    )
    report["wall_s"] = round(time.monotonic() - start, 1)
    report["run_dir"] = str(base)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One process hosting several lightweight generator members for bench_control_plane.py.

Each member is a generator as the learner sees it, minus the model: its own gRPC ControlClient
(register, heartbeats, the Control event stream, weight-load reports), its own Redis connection
(heartbeat key, XREADGROUP on the prompt stream, the atomic publish-and-ack script) and its own
WeightReceiver holding its own Gloo rank in every group epoch. Where a generator would sample, a
stub builds a trivially valid rollout group for the task (num_samples completions of random
tokens below the vocabulary size, at most max_new_tokens long, stamped with the version it has
loaded); where it would load weights, it takes every bucket off the wire and touches each tensor.

    python benchmarks/_member_host.py CONFIG --members K --first-index I --id-prefix P
        --out EVENTS.json [--go-file PATH] [--set section.field=value ...]

The learner address and Redis URL come from the config (or LPREG_LEARNER_ADDRESS and
LPREG_REDIS_URL), the bearer token from LPREG_AUTH_TOKEN. On Shutdown (or SIGTERM) every member
stops and the host writes what each member saw, with wall-clock (``time.time()``) stamps, to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lpreg_core.config import RunConfig, load_config  # noqa: E402
from lpreg_core.rollout import SCHEMA_VERSION  # noqa: E402
from lpreg_core.staleness import StalenessPolicy  # noqa: E402
from lpreg_core.weights import manifest_from_proto  # noqa: E402
from lpreg_core.wire.lpreg.v1 import control_pb2, rollout_pb2  # noqa: E402
from services.common.auth import load_auth_token  # noqa: E402
from services.common.env import learner_address, redis_password, redis_url  # noqa: E402
from services.generator.control_client import ControlClient  # noqa: E402
from services.transport import RedisStreams  # noqa: E402
from services.weight_sync import WeightReceiver  # noqa: E402

log = logging.getLogger("lpreg.bench.member_host")

_insecure_channel = grpc.insecure_channel


def _own_connection_channel(target: str, options: Any = None, compression: Any = None) -> Any:
    # gRPC shares one connection between channels of a process with equal targets and options
    # (its global subchannel pool); separate generator processes each have their own, so every
    # member here gets its own connection too.
    options = [*(options or []), ("grpc.use_local_subchannel_pool", 1)]
    return _insecure_channel(target, options=options, compression=compression)


grpc.insecure_channel = _own_connection_channel


def _vocab_size(model_path: str) -> int:
    return int(json.loads((Path(model_path) / "config.json").read_text())["vocab_size"])


class Member:
    """One lightweight generator member (see the module docstring)."""

    def __init__(self, config: RunConfig, generator_id: str, vocab_size: int, seed: int) -> None:
        self.config = config
        self.id = generator_id
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.policy = StalenessPolicy(config.learner.prompts_per_step, config.learner.max_staleness)
        self.stop = threading.Event()
        self.loaded_version = 0
        self.announced_version = 0
        self.tokens_generated = 0
        self.in_flight = 0
        self.client = ControlClient(
            config.control,
            address=learner_address(config.control),
            generator_id=generator_id,
            backend="stub",
            num_workers=1,
            vocab_size=vocab_size,
            device="cpu",
            auth_token=load_auth_token(config.control),
            run_id=config.run_id,
        )
        self.streams = RedisStreams(
            config.redis,
            config.run_id,
            consumer=generator_id,
            password=redis_password(config.redis),
            url=redis_url(config.redis),
        )
        self.receiver = WeightReceiver(device_host="127.0.0.1")
        self.record: dict[str, Any] = {
            "id": generator_id,
            "register_calls": [],
            "joins": [],
            "loads": [],
            "groups_published": 0,
            "groups_lost": 0,
            "sampler_errors": [],
            "shutdown": None,
        }
        self.threads: list[threading.Thread] = []

    # -- control --------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.streams.connect()
            start = time.time()
            reply = self.client.register()
        except Exception as e:  # recorded: a member that never registered counts as dropped
            self.record["control_error"] = f"register: {type(e).__name__}: {e}"
            self.stop.set()
            return
        self.record["register_calls"].append([start, time.time()])
        self.client.start_heartbeats(
            self._heartbeat_state, self.config.generator.heartbeat_interval_s
        )
        self.announced_version = reply.current_version
        for target, name in ((self._follow_events, "events"), (self._sample_loop, "sampler")):
            thread = threading.Thread(target=target, name=f"{self.id}-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _heartbeat_state(self) -> tuple[int, int, int]:
        try:
            self.streams.heartbeat(self.id, self.config.generator.heartbeat_ttl_s)
        except Exception as e:  # as the real generator: Redis trouble must not stop gRPC beats
            log.warning("%s: redis heartbeat failed: %s", self.id, e)
        return self.loaded_version, self.tokens_generated, self.in_flight

    def _follow_events(self) -> None:
        try:
            for event in self.client.events():
                kind = event.WhichOneof("event")
                if kind == "join":
                    self._join(event.join)
                elif kind == "publish":
                    self._load(event.publish)
                elif kind == "shutdown":
                    self.record["shutdown"] = [time.time(), event.shutdown.reason]
                    break
                if self.stop.is_set():
                    break
        except Exception as e:  # recorded: the benchmark counts a member that lost the learner
            self.record["control_error"] = f"{type(e).__name__}: {e}"
            log.error("%s: control loop ended: %s", self.id, e)
        finally:
            self.stop.set()

    def _join(self, join: control_pb2.JoinGroup) -> None:
        start = time.time()
        error = ""
        try:
            self.receiver.leave()
            self.receiver.join(
                epoch=join.epoch,
                rank=join.rank_offset,
                world_size=join.world_size,
                store_host=join.store_host,
                store_port=join.store_port,
                backend=join.backend,
                timeout_s=join.timeout_s,
                device="cpu",
                secret=join.secret,
            )
        except Exception as e:  # a failed join costs this member the epoch; it is recorded
            error = f"{type(e).__name__}: {e}"
            log.warning("%s: join of epoch %d failed: %s", self.id, join.epoch, error)
        self.record["joins"].append(
            {
                "epoch": join.epoch,
                "rank": join.rank_offset,
                "world_size": join.world_size,
                "start": start,
                "end": time.time(),
                "error": error,
            }
        )

    def _load(self, publish: control_pb2.PublishWeights) -> None:
        received = time.time()
        self.announced_version = max(self.announced_version, publish.version)
        manifest = manifest_from_proto(publish.manifest)
        error = ""
        num_bytes = 0
        try:
            with self.receiver.receive_buckets(
                manifest, "cpu", self.config.learner.publish_timeout_s
            ) as stream:
                for _name, tensor in stream:
                    num_bytes += tensor.numel() * tensor.element_size()
        except Exception as e:  # reported to the learner as a failed load, and recorded
            error = f"{type(e).__name__}: {e}"
        loaded = time.time()
        if not error:
            self.loaded_version = max(self.loaded_version, publish.version)
        accepted: bool | None = None
        try:
            accepted = self.client.report_loaded(
                publish.version, manifest.checksum, not error, error, loaded - received
            )
        except Exception as e:  # a stale session; the re-registration is recorded
            error = error or f"report: {type(e).__name__}: {e}"
        self.record["loads"].append(
            {
                "version": publish.version,
                "epoch": publish.epoch,
                "event": received,
                "loaded": loaded,
                "reported": time.time(),
                "bytes": num_bytes,
                "accepted": accepted,
                "error": error,
            }
        )

    # -- the stub sampler -----------------------------------------------------------------------
    def _group(self, task: rollout_pb2.PromptTask) -> rollout_pb2.RolloutGroup:
        version = self.loaded_version
        group = rollout_pb2.RolloutGroup(
            schema_version=SCHEMA_VERSION,
            run_id=task.run_id,
            rollout_id=uuid.uuid4().hex,
            task_id=task.task_id,
            prompt_id=task.prompt_id,
            generator_id=self.id,
            data_index=task.data_index,
            issue_version=task.issue_version,
            prompt_token_ids=[ord(c) % self.vocab_size for c in task.prompt] or [0],
            vocab_size=self.vocab_size,
        )
        # A uniform policy's log-probability: finite, negative, and what an untrained model of
        # this vocabulary roughly assigns, so the off-policy weights stay near 1.
        logprob = -math.log(self.vocab_size)
        for _ in range(task.num_samples):
            n = self.rng.randint(1, task.max_new_tokens)
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=[self.rng.randrange(self.vocab_size) for _ in range(n)],
                    logprobs=[logprob] * n,
                    versions=[version] * n,
                    reward=float(self.rng.random() < 0.5),
                    finish_reason=rollout_pb2.FINISH_REASON_LENGTH,
                    text="",
                )
            )
        group.created_at = time.time()
        return group

    def _sample_loop(self) -> None:
        cfg = self.config
        while not self.stop.is_set():
            learner = max(self.announced_version, self.client.learner_version or 0)
            if self.policy.generator_should_wait(learner, self.loaded_version):
                self.stop.wait(0.05)
                continue
            try:
                deliveries = self.streams.read_tasks(
                    cfg.generator.max_tasks_in_flight, cfg.redis.block_ms
                )
                self.in_flight = len(deliveries)
                for d in deliveries:
                    group = self._group(d.value)
                    if self.streams.publish_group_and_ack_task(group, d.entry_id) is None:
                        self.record["groups_lost"] += 1
                        continue
                    self.record["groups_published"] += 1
                    self.tokens_generated += sum(len(c.token_ids) for c in group.completions)
                self.in_flight = 0
            except Exception as e:  # recorded; a sampler error never takes the member down
                if self.stop.is_set():
                    return
                self.record["sampler_errors"].append(f"{type(e).__name__}: {e}")
                self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.client.close()
        for thread in self.threads:
            thread.join(timeout=5.0)
        self.receiver.close()
        self.streams.close()
        self.record["registrations"] = self.client.registrations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--members", type=int, required=True)
    parser.add_argument("--first-index", type=int, default=0)
    parser.add_argument("--id-prefix", default="member")
    parser.add_argument("--out", required=True)
    parser.add_argument("--go-file", default=None, help="wait for this file before registering")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(args.config, args.overrides)
    vocab_size = _vocab_size(config.model.path)
    import torch

    torch.set_num_threads(1)
    stopped = threading.Event()

    def _graceful(signum: int, _frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    members = [
        Member(config, f"{args.id_prefix}-{i:03d}", vocab_size, seed=i)
        for i in range(args.first_index, args.first_index + args.members)
    ]
    # Every host imports and builds its members first and says so; the benchmark then releases
    # all members at once (the go file), so registration is timed as one burst of N, free of the
    # process start-up skew.
    if args.go_file:
        Path(args.out + ".ready").write_text(str(time.time()))
        while not Path(args.go_file).exists() and not stopped.is_set():
            time.sleep(0.005)
    # Members register concurrently, as separate generators starting together would.
    starters = [threading.Thread(target=m.start, daemon=True) for m in members]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    while not stopped.is_set() and not all(m.stop.is_set() for m in members):
        stopped.wait(0.2)
    for m in members:
        m.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "pid": os.getpid(),
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "members": [m.record for m in members],
    }
    tmp = Path(args.out + ".partial")
    tmp.write_text(json.dumps(out))
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

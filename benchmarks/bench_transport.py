"""Rollout groups through the project's Redis transport vs raw redis-py; prints one JSON object.

A private redis-server (found on PATH, loopback, free port, no persistence: the figure is the
transport's, not the disk's) carries --groups rollout groups of 8 completions x 4,096 tokens:

  project  services.transport.redis_streams.RedisStreams, as the services drive it: the generator
           encodes each group and publishes it while acking its task (publish_group_and_ack_task,
           one MULTI/EXEC per group); the learner consumes in batches of --batch (read_groups:
           XREADGROUP, decode, validate against the schema, the run, the vocabulary and the
           bounds) and acks each batch (ack_groups, retiring the tasks, then trimming).
  raw      redis-py XADD of byte strings of the same sizes, one per group, XREADGROUP in batches
           of --batch, XACK per batch.
  codec    no Redis: lpreg_core.rollout.encode_group and decode_group (parse and validate) of
           every group, the part of the project's path that raw has no counterpart for.

The tasks are issued and read by the generator before the clock starts (both sides get the
groups' payloads ready-made; neither times building them). The learner's check of each group
against what it issued (services.learner) is not part of the transport and not timed here.
groups_per_s, raw_groups_per_s and codec_groups_per_s are the best of --repeats (alternating
sides, fresh streams each time); ratio = groups_per_s / raw_groups_per_s. The codec's time per
group is a floor under the project's beyond raw's: ratio cannot exceed
raw_s / (raw_s + codec_s), reported as codec_bound_ratio.

    .venv/bin/python benchmarks/bench_transport.py [--groups 200] [--repeats 3]
    .venv/bin/python benchmarks/bench_transport.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis as redis_lib

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.config import RedisConfig  # noqa: E402
from lpreg_core.rollout import decode_group, encode_group  # noqa: E402
from lpreg_core.wire.lpreg.v1 import rollout_pb2  # noqa: E402
from services.transport.redis_streams import RedisStreams  # noqa: E402

VOCAB = 151_936
NUM_COMPLETIONS = 8
PROMPT_TOKENS = 256
REDIS_START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (make setup installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not answer at {url}") from None
            time.sleep(0.05)
    client.close()
    return proc, url


def make_task(run_id: str, i: int) -> rollout_pb2.PromptTask:
    return rollout_pb2.PromptTask(
        run_id=run_id,
        task_id=f"t-{i}",
        prompt_id=f"p-{i}",
        prompt="What is 2+2?",
        answer="4",
        data_index=i,
        num_samples=NUM_COMPLETIONS,
        issue_version=3,
        issued_at=time.time(),
        temperature=1.0,
        max_new_tokens=4096,
    )


def make_group(
    task: rollout_pb2.PromptTask, num_tokens: int, rng: np.random.Generator
) -> rollout_pb2.RolloutGroup:
    """A group as a generator publishes it: LM-like token ids, log-probs and versions."""
    completions = []
    for _ in range(NUM_COMPLETIONS):
        completions.append(
            rollout_pb2.Completion(
                token_ids=rng.integers(0, VOCAB, num_tokens).tolist(),
                logprobs=(-rng.exponential(1.0, num_tokens)).astype(np.float32).tolist(),
                versions=[3] * (num_tokens // 2) + [4] * (num_tokens - num_tokens // 2),
                reward=float(rng.integers(0, 2)),
                finish_reason=rollout_pb2.FINISH_REASON_LENGTH,
            )
        )
    return rollout_pb2.RolloutGroup(
        run_id=task.run_id,
        rollout_id=f"r-{task.task_id}",
        task_id=task.task_id,
        prompt_id=task.prompt_id,
        generator_id="gen-0",
        data_index=task.data_index,
        issue_version=task.issue_version,
        prompt_token_ids=rng.integers(0, VOCAB, PROMPT_TOKENS).tolist(),
        completions=completions,
        created_at=time.time(),
        vocab_size=VOCAB,
    )


def run_project(url: str, run_id: str, groups: list[rollout_pb2.RolloutGroup], batch: int) -> float:
    """Seconds to publish, consume, validate and ack every group through RedisStreams."""
    config = RedisConfig(url=url, block_ms=1000)
    learner = RedisStreams(config, run_id, "learner")
    generator = RedisStreams(config, run_id, "gen-0")
    learner.connect()
    generator.connect()
    try:
        tasks = [make_task(run_id, i) for i in range(len(groups))]
        learner.issue_tasks(tasks)
        deliveries = []
        while len(deliveries) < len(tasks):
            deliveries += generator.read_tasks(count=len(tasks) - len(deliveries), block_ms=1000)
        task_entry = {d.value.task_id: d.entry_id for d in deliveries}
        start = time.perf_counter()
        for group in groups:
            if generator.publish_group_and_ack_task(group, task_entry[group.task_id]) is None:
                raise RuntimeError(f"task {group.task_id} was not pending")
        received = 0
        while received < len(groups):
            got = learner.read_groups(
                count=min(batch, len(groups) - received), block_ms=1000, vocab_size=VOCAB
            )
            learner.ack_groups([d.entry_id for d in got], retire=[d.value.task_id for d in got])
            received += len(got)
        elapsed = time.perf_counter() - start
        if learner.num_dead_lettered:
            raise RuntimeError(f"{learner.num_dead_lettered} groups were dead-lettered")
        return elapsed
    finally:
        learner.close()
        generator.close()


def run_raw(url: str, key: str, payloads: list[bytes], batch: int) -> float:
    """Seconds to XADD, XREADGROUP and XACK byte strings of the groups' sizes."""
    client = redis_lib.Redis.from_url(url)
    try:
        client.xgroup_create(key, "learner", id="0", mkstream=True)
        start = time.perf_counter()
        for payload in payloads:
            client.xadd(key, {b"data": payload})
        received = 0
        while received < len(payloads):
            reply = client.xreadgroup(
                "learner", "learner", {key: ">"}, count=min(batch, len(payloads) - received),
                block=1000,
            )  # fmt: skip
            entries = reply[0][1] if reply else []
            data = [fields[b"data"] for _id, fields in entries]
            client.xack(key, "learner", *[entry_id for entry_id, _ in entries])
            received += len(data)
        return time.perf_counter() - start
    finally:
        client.delete(key)
        client.close()


def run_codec(groups: list[rollout_pb2.RolloutGroup]) -> float:
    """Seconds to encode every group and decode and validate it again, as the transport does."""
    run_id = groups[0].run_id
    start = time.perf_counter()
    for group in groups:
        decode_group(encode_group(group), max_bytes=1 << 30, vocab_size=VOCAB, run_id=run_id)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=200, help="groups per measurement")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per completion")
    parser.add_argument("--batch", type=int, default=16, help="groups per learner read")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="10 groups of 8 x 512 tokens, once")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.groups, args.tokens, args.repeats = 10, 512, 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_transport_") as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            project_s, raw_s, codec_s = [], [], []
            sizes: list[int] = []
            for r in range(args.repeats):
                run_id = f"bench{r}"
                groups = [
                    make_group(make_task(run_id, i), args.tokens, rng) for i in range(args.groups)
                ]
                payloads = [encode_group(g) for g in groups]
                sizes = [len(p) for p in payloads]
                raw_payloads = [rng.bytes(n) for n in sizes]
                project_s.append(run_project(url, run_id, groups, args.batch))
                raw_s.append(run_raw(url, f"raw{r}", raw_payloads, args.batch))
                codec_s.append(run_codec(groups))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    groups_per_s = args.groups / min(project_s)
    raw_groups_per_s = args.groups / min(raw_s)
    result = {
        "groups": args.groups,
        "completions_per_group": NUM_COMPLETIONS,
        "tokens_per_completion": args.tokens,
        "group_bytes": int(np.mean(sizes)),
        "batch": args.batch,
        "repeats": args.repeats,
        "groups_per_s": groups_per_s,
        "raw_groups_per_s": raw_groups_per_s,
        "ratio": groups_per_s / raw_groups_per_s,
        "codec_groups_per_s": args.groups / min(codec_s),
        "codec_bound_ratio": min(raw_s) / (min(raw_s) + min(codec_s)),
        "project_all_s": project_s,
        "raw_all_s": raw_s,
        "codec_all_s": codec_s,
        "load_average_1m": os.getloadavg()[0],
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

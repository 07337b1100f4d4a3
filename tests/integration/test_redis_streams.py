"""RedisStreams against a real redis-server: delivery, dead-lettering, reclaim, replay, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lpreg_core.config import RedisConfig
from lpreg_core.rollout import encode_group
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.common.retry import backoff_delays, retry_call
from services.transport.redis_streams import (
    RedisStreams,
    TransportAuthError,
    TransportUnavailable,
    redact_url,
)

RUN = "it"
VOCAB = 50
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_task(task_id: str) -> rollout_pb2.PromptTask:
    return rollout_pb2.PromptTask(
        run_id=RUN,
        task_id=task_id,
        prompt_id=f"p-{task_id}",
        prompt="2+2=",
        answer="4",
        num_samples=2,
        issue_version=1,
        issued_at=1.0,
        temperature=1.0,
        max_new_tokens=4,
    )


def make_group(task: rollout_pb2.PromptTask, *, num_tokens: int = 3) -> rollout_pb2.RolloutGroup:
    completion = rollout_pb2.Completion(
        token_ids=[7] * num_tokens,
        logprobs=[-0.25] * num_tokens,
        versions=[1] * num_tokens,
        reward=1.0,
        finish_reason=rollout_pb2.FINISH_REASON_STOP,
    )
    return rollout_pb2.RolloutGroup(
        run_id=task.run_id,
        rollout_id=f"r-{task.task_id}",
        task_id=task.task_id,
        prompt_id=task.prompt_id,
        generator_id="gen-test",
        issue_version=task.issue_version,
        prompt_token_ids=[1, 2, 3],
        completions=[completion, completion],
        vocab_size=VOCAB,
    )


def redis_config(url: str, **overrides: Any) -> RedisConfig:
    fields: dict[str, Any] = dict(
        url=url,
        claim_idle_ms=100,
        block_ms=50,
        connect_retries=40,
        retry_backoff_s=0.02,
        retry_backoff_max_s=0.25,
        max_entry_bytes=4096,
    )
    fields.update(overrides)
    return RedisConfig(**fields)


@pytest.fixture
def make_streams(redis_server: Any) -> Iterator[Callable[..., RedisStreams]]:
    """Connected RedisStreams for run RUN on the test's redis-server, closed at teardown."""
    opened: list[RedisStreams] = []

    def make(consumer: str, **kwargs: Any) -> RedisStreams:
        config = kwargs.pop("config", None) or redis_config(redis_server.url)
        streams = RedisStreams(config, RUN, consumer, **kwargs)
        streams.connect()
        opened.append(streams)
        return streams

    yield make
    for s in opened:
        s.close()


def read_all_groups(streams: RedisStreams, expected: int) -> list[Any]:
    """Read until ``expected`` groups arrived (the test's timeout bounds the loop)."""
    out: list[Any] = []
    while len(out) < expected:
        out += streams.read_groups(count=expected - len(out), block_ms=50, vocab_size=VOCAB)
    return out


def take_one_task(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> tuple[RedisStreams, RedisStreams, Any, redis.Redis]:
    """A learner that issued task t0, the generator gen-0 holding its delivery, a raw client."""
    learner, gen = make_streams("learner"), make_streams("gen-0")
    learner.issue_tasks([make_task("t0")])
    (task,) = gen.read_tasks(count=1, block_ms=50)
    return learner, gen, task, redis_server.client()


# -- a consumer in its own process, killed with SIGKILL ----------------------------------------------

CHILD = r"""
import json, sys, time
from lpreg_core.config import RedisConfig
from services.transport.redis_streams import RedisStreams

role, url, consumer, count, num_ack = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
streams = RedisStreams(RedisConfig(url=url, block_ms=50), "it", consumer)
streams.connect()
got = []
while len(got) < count:
    if role == "generator":
        got += streams.read_tasks(count - len(got), block_ms=50)
    else:
        got += streams.read_groups(count - len(got), block_ms=50, vocab_size=50)
acked = [d.entry_id for d in got[:num_ack]]
if role == "learner":
    streams.ack_groups(acked)
print(json.dumps({"read": [d.entry_id for d in got], "acked": acked}), flush=True)
time.sleep(3600)
"""


def run_child_then_kill(
    role: str, url: str, consumer: str, count: int, num_ack: int = 0
) -> dict[str, list[str]]:
    """Start a consumer process, wait for its report, then SIGKILL it (a crash, no cleanup)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, role, url, consumer, str(count), str(num_ack)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"{role} child exited early: {proc.communicate()[1]}")
        return dict(json.loads(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_task_to_group_round_trip_with_acks(make_streams: Callable[..., RedisStreams]) -> None:
    learner, gen = make_streams("learner"), make_streams("gen-0")
    ids = learner.issue_tasks([make_task(f"t{i}") for i in range(3)])
    assert learner.stream_lengths() == {"prompts": 3, "rollouts": 0, "dlq": 0}

    tasks = gen.read_tasks(count=10, block_ms=50)
    assert [d.entry_id for d in tasks] == ids
    assert [d.value.task_id for d in tasks] == ["t0", "t1", "t2"]
    assert not any(d.redelivered for d in tasks)
    assert learner.pending_counts() == {"prompts": 3, "rollouts": 0}

    published = [gen.publish_group_and_ack_task(make_group(d.value), d.entry_id) for d in tasks]
    assert all(p is not None for p in published)
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 0}
    # A second publish for an acked task (a retry, or a reclaimed duplicate) writes nothing.
    assert gen.publish_group_and_ack_task(make_group(tasks[0].value), tasks[0].entry_id) is None

    groups = read_all_groups(learner, 3)
    assert [d.entry_id for d in groups] == published
    assert [d.value.task_id for d in groups] == ["t0", "t1", "t2"]
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 3}
    assert learner.ack_groups([d.entry_id for d in groups]) == 3
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 0}
    assert learner.read_groups(count=10, block_ms=10, vocab_size=VOCAB) == []
    # Every entry was delivered and acked, so the whole stream could be trimmed.
    assert learner.stream_lengths()["rollouts"] == 0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_corrupt_entries_go_to_the_dlq_and_good_ones_still_come_through(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    reasons: list[str] = []
    learner = make_streams("learner", on_dead_letter=reasons.append)
    gen = make_streams("gen-0")
    raw = redis_server.client()
    rollouts = "lpreg:it:rollouts"

    learner.issue_tasks([make_task("good-0"), make_task("good-1")])
    raw.xadd("lpreg:it:prompts", {"data": b"\x00\xff garbage"})
    tasks = gen.read_tasks(count=10, block_ms=50)
    assert [d.value.task_id for d in tasks] == ["good-0", "good-1"]

    gen.publish_group_and_ack_task(make_group(tasks[0].value), tasks[0].entry_id)
    bad_ids = [
        raw.xadd(rollouts, {"data": b"\x08\x01\x12\xff not protobuf"}),
        raw.xadd(rollouts, {"payload": encode_group(make_group(tasks[1].value))}),
        raw.xadd(rollouts, {"data": encode_group(make_group(make_task("x"), num_tokens=0))}),
        raw.xadd(rollouts, {"data": encode_group(make_group(make_task("big"), num_tokens=2000))}),
    ]
    gen.publish_group_and_ack_task(make_group(tasks[1].value), tasks[1].entry_id)

    groups = read_all_groups(learner, 2)
    assert [d.value.task_id for d in groups] == ["good-0", "good-1"]
    letters = learner.read_dead_letters()
    assert [(x.source, x.reason) for x in letters] == [
        ("prompts", "decode"),
        ("rollouts", "decode"),
        ("rollouts", "decode"),
        ("rollouts", "validate"),
        ("rollouts", "too_large"),
    ]
    assert [x.source_entry_id for x in letters[1:]] == [i.decode() for i in bad_ids]
    assert all(x.detail for x in letters)
    assert letters[1].payload == b"\x08\x01\x12\xff not protobuf"
    assert reasons == ["decode", "decode", "validate", "too_large"]
    assert learner.dlq_length() == 5
    # Bad entries are acked as they are dead-lettered; only the good groups await the checkpoint.
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 2}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_tasks_of_a_dead_generator_are_reclaimed(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner = make_streams("learner")
    ids = learner.issue_tasks([make_task("t0"), make_task("t1")])
    dead = run_child_then_kill("generator", redis_server.url, "gen-dead", count=1)
    assert dead["read"] == ids[:1]

    survivor = make_streams("gen-alive")
    got: list[Any] = []
    while len(got) < 2:
        got += survivor.read_tasks(count=2, block_ms=20)
    by_task = {d.value.task_id: d for d in got}
    assert by_task["t0"].redelivered and by_task["t0"].entry_id == ids[0]
    assert not by_task["t1"].redelivered
    assert survivor.num_reclaimed_tasks == 1
    for d in got:
        assert survivor.publish_group_and_ack_task(make_group(d.value), d.entry_id) is not None
    assert learner.pending_counts()["prompts"] == 0
    assert sorted(d.value.task_id for d in read_all_groups(learner, 2)) == ["t0", "t1"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_slow_generator_cannot_publish_a_reclaimed_task_twice(
    make_streams: Callable[..., RedisStreams],
) -> None:
    learner, slow, fast = make_streams("learner"), make_streams("slow"), make_streams("fast")
    learner.issue_tasks([make_task("t0")])
    (first,) = slow.read_tasks(count=1, block_ms=50)
    reclaimed: list[Any] = []
    while not reclaimed:
        reclaimed = fast.read_tasks(count=1, block_ms=20)
    assert reclaimed[0].entry_id == first.entry_id and reclaimed[0].redelivered

    assert slow.publish_group_and_ack_task(make_group(first.value), first.entry_id) is not None
    assert fast.publish_group_and_ack_task(make_group(first.value), first.entry_id) is None
    assert learner.stream_lengths()["rollouts"] == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_publish_that_loses_leaves_no_trace(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen = make_streams("learner"), make_streams("gen-0")
    learner.issue_tasks([make_task("t0"), make_task("t1")])
    first, second = gen.read_tasks(count=2, block_ms=50)
    assert gen.publish_group_and_ack_task(make_group(first.value), first.entry_id) is not None
    assert [d.value.task_id for d in read_all_groups(learner, 1)] == ["t0"]
    raw = redis_server.client()
    added_before = raw.xinfo_stream("lpreg:it:rollouts")["entries-added"]

    # Another generator finished the task first.
    raw.xack("lpreg:it:prompts", "generators", second.entry_id)
    assert gen.publish_group_and_ack_task(make_group(second.value), second.entry_id) is None
    stream = raw.xinfo_stream("lpreg:it:rollouts")
    assert stream["length"] == 1 and stream["entries-added"] == added_before
    assert learner.read_groups(count=10, block_ms=10, vocab_size=VOCAB) == []

    # The learner's lag stays exact: the deleted group is not counted as undelivered for ever.
    learner.issue_tasks([make_task("t2")])
    (third,) = gen.read_tasks(count=1, block_ms=50)
    assert gen.publish_group_and_ack_task(make_group(third.value), third.entry_id) is not None
    assert [d.value.task_id for d in read_all_groups(learner, 1)] == ["t2"]
    assert learner.undelivered()["rollouts"] == 0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_publish_whose_task_group_vanished_writes_nothing(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen, task, raw = take_one_task(redis_server, make_streams)
    raw.xgroup_destroy("lpreg:it:prompts", "generators")
    # NOGROUP: the groups are recreated and the task, no longer pending, is not published.
    assert gen.publish_group_and_ack_task(make_group(task.value), task.entry_id) is None
    assert learner.stream_lengths()["rollouts"] == 0
    assert [g["name"] for g in raw.xinfo_groups("lpreg:it:prompts")] == [b"generators"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_failed_append_leaves_the_task_pending(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen, task, raw = take_one_task(redis_server, make_streams)
    raw.delete("lpreg:it:rollouts")
    raw.set("lpreg:it:rollouts", b"not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        gen.publish_group_and_ack_task(make_group(task.value), task.entry_id)
    assert raw.xpending("lpreg:it:prompts", "generators")["pending"] == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_own_tasks_in_progress_are_kept_not_handed_out_again(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen, task, raw = take_one_task(redis_server, make_streams)

    def times_delivered() -> int:
        (entry,) = raw.xpending_range("lpreg:it:prompts", "generators", "-", "+", 1)
        assert entry["consumer"] == b"gen-0"
        return int(entry["times_delivered"])

    # Once idle past claim_idle_ms the generator's own read re-claims the task (a keep-alive)
    # without returning it a second time.
    while times_delivered() < 2:
        assert gen.read_tasks(count=1, block_ms=20) == []
    assert gen.num_reclaimed_tasks == 0

    gen.release_tasks([task.entry_id])
    again: list[Any] = []
    while not again:
        again = gen.read_tasks(count=1, block_ms=20)
    assert again[0].entry_id == task.entry_id and again[0].redelivered
    assert gen.publish_group_and_ack_task(make_group(again[0].value), task.entry_id) is not None


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_restarted_learner_replays_exactly_its_unacked_groups(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen = make_streams("learner"), make_streams("gen-0")
    learner.issue_tasks([make_task(f"t{i}") for i in range(6)])
    for d in gen.read_tasks(count=6, block_ms=50):
        gen.publish_group_and_ack_task(make_group(d.value), d.entry_id)
    learner.close()

    crashed = run_child_then_kill("learner", redis_server.url, "learner", count=4, num_ack=1)
    assert len(crashed["read"]) == 4
    unacked = crashed["read"][1:]

    restarted = make_streams("learner")
    replayed: list[Any] = []
    while True:
        page = restarted.read_groups(count=2, block_ms=10, vocab_size=VOCAB)
        if not page or not page[0].redelivered:
            break
        replayed += page
    assert [d.entry_id for d in replayed] == unacked
    assert all(d.redelivered for d in replayed)
    fresh = page + read_all_groups(restarted, 2 - len(page))
    assert [d.value.task_id for d in fresh] == ["t4", "t5"]
    assert not any(d.redelivered for d in fresh)

    # Another restart after acking some: only the rest comes back.
    restarted.ack_groups(unacked[:2])
    again = make_streams("learner")
    assert [d.entry_id for d in again.read_groups(count=10, block_ms=10, vocab_size=VOCAB)] == [
        unacked[2]
    ] + [d.entry_id for d in fresh]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_redis_restart_mid_stream_loses_nothing_acked(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    learner, gen = make_streams("learner"), make_streams("gen-0")
    learner.issue_tasks([make_task(f"t{i}") for i in range(6)])
    learner.set_version(7)
    first = gen.read_tasks(count=3, block_ms=50)
    for d in first[:2]:
        gen.publish_group_and_ack_task(make_group(d.value), d.entry_id)
    before = read_all_groups(learner, 2)
    learner.ack_groups([before[0].entry_id])

    # A learner blocked in a read while Redis goes away must come back and see new groups.
    received: list[Any] = []
    errors: list[BaseException] = []

    def blocked_reader() -> None:
        try:
            while not received:
                received.extend(learner.read_groups(count=1, block_ms=500, vocab_size=VOCAB))
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=blocked_reader)
    reader.start()
    redis_server.restart()

    assert learner.get_version() == 7
    assert learner.pending_counts() == {"prompts": 1, "rollouts": 1}
    rest = gen.read_tasks(count=3, block_ms=50)
    assert [d.value.task_id for d in rest] == ["t3", "t4", "t5"]
    for d in [first[2], *rest]:
        assert gen.publish_group_and_ack_task(make_group(d.value), d.entry_id) is not None
    reader.join(timeout=60)
    assert not reader.is_alive() and not errors, errors
    received += read_all_groups(learner, 4 - len(received))
    assert [d.value.task_id for d in received] == ["t2", "t3", "t4", "t5"]
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 5}

    # What was acked before the restart stays acked: a new learner replays the other five only.
    replay = make_streams("learner").read_groups(count=10, block_ms=10, vocab_size=VOCAB)
    assert [d.value.task_id for d in replay] == ["t1", "t2", "t3", "t4", "t5"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_operations_retry_while_redis_is_down(
    redis_server: Any, make_streams: Callable[..., RedisStreams]
) -> None:
    streams = make_streams("learner")
    streams.issue_tasks([make_task("t0")])
    redis_server.stop()
    result: list[dict[str, int]] = []
    caller = threading.Thread(target=lambda: result.append(streams.stream_lengths()))
    caller.start()
    # The call above starts against a dead server (the first tries are refused) and must
    # succeed once the server is back, within its 40 bounded retries.
    redis_server.start()
    caller.join(timeout=30)
    assert result == [{"prompts": 1, "rollouts": 0, "dlq": 0}]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unreachable_redis_raises_transport_unavailable(free_port: Callable[[], int]) -> None:
    port = free_port()
    config = redis_config(
        f"redis://:hunter2@127.0.0.1:{port}/0",
        connect_retries=2,
        retry_backoff_s=0.01,
        retry_backoff_max_s=0.02,
    )
    streams = RedisStreams(config, RUN, "learner")
    with pytest.raises(TransportUnavailable) as info:
        streams.connect()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "3 times" in message
    assert "hunter2" not in message
    assert streams.num_retries == 2


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_password_protected_redis(redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory(password="s3cret")
    config = redis_config(server.url)
    for password in (None, "wrong"):
        with pytest.raises(TransportAuthError, match="refused the credentials") as info:
            RedisStreams(config, RUN, "learner", password=password).connect()
        assert "s3cret" not in str(info.value)
    streams = RedisStreams(config, RUN, "learner", password="s3cret")
    streams.connect()
    assert streams.issue_tasks([make_task("t0")])
    streams.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_run_state_heartbeats_and_version(make_streams: Callable[..., RedisStreams]) -> None:
    learner = make_streams("learner")
    other_run = RedisStreams(learner.config, "other", "learner")
    assert learner.get_version() is None
    learner.set_version(3)
    assert learner.get_version() == 3
    learner.heartbeat("gen-1", ttl_s=60)
    learner.heartbeat("gen-0", ttl_s=60)
    other_run.heartbeat("gen-9", ttl_s=60)
    assert learner.live_generators() == ["gen-0", "gen-1"]
    learner.heartbeat("gen-1", ttl_s=0.001)
    # An expired key is gone for good; wait for it without a fixed sleep.
    while "gen-1" in learner.live_generators():
        pass
    assert learner.live_generators() == ["gen-0"]
    other_run.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_trimming_never_deletes_unacked_entries(make_streams: Callable[..., RedisStreams]) -> None:
    learner, gen = make_streams("learner"), make_streams("gen-0")
    num_tasks = 400
    learner.issue_tasks([make_task(f"t{i}") for i in range(num_tasks)])
    delivered: list[Any] = []
    while len(delivered) < num_tasks:
        delivered += gen.read_tasks(count=100, block_ms=50)
    for d in delivered[:300]:
        gen.publish_group_and_ack_task(make_group(d.value), d.entry_id)

    trimmed = learner.trim_acknowledged()
    assert trimmed["prompts"] > 0
    assert learner.stream_lengths()["prompts"] < num_tasks
    # The 100 un-acked tasks are all still there for a restarted generator.
    replayed = make_streams("gen-0").read_tasks(count=200, block_ms=10)
    assert [d.entry_id for d in replayed] == [d.entry_id for d in delivered[300:]]


# -- helpers of the module, no server needed ---------------------------------------------------------


def test_retry_call_backs_off_exponentially_then_reraises() -> None:
    waits: list[float] = []
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionError(f"refused #{len(calls)}")

    with pytest.raises(ConnectionError, match="refused #5"):
        retry_call(failing, attempts=5, base_s=0.1, max_s=0.3, sleep=waits.append)
    assert waits == [0.1, 0.2, 0.3, 0.3]


def test_retry_call_returns_first_success_and_reports_retries() -> None:
    outcomes: list[object] = [TimeoutError("slow"), ConnectionError("down"), "ok"]
    seen: list[tuple[int, str, float]] = []

    def flaky() -> object:
        result = outcomes.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    result = retry_call(
        flaky,
        attempts=5,
        base_s=1.0,
        max_s=8.0,
        on_retry=lambda n, e, d: seen.append((n, str(e), d)),
        sleep=lambda _s: None,
    )
    assert result == "ok"
    assert seen == [(1, "slow", 1.0), (2, "down", 2.0)]


def test_retry_call_does_not_retry_other_errors() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        retry_call(broken, attempts=5, base_s=0.01, max_s=0.01, sleep=lambda _s: None)
    assert calls == [1]


def test_jittered_delays_stay_within_half_to_full_delay() -> None:
    for d, expected in zip(
        backoff_delays(6, base_s=1.0, max_s=4.0, jitter=True), [1, 2, 4, 4, 4], strict=True
    ):
        assert expected / 2 <= d <= expected


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

"""Poison and forged entries through a real redis-server: RedisStreams dead-letters and acks them
on both streams, so no consumer (nor a restarted one replaying its pending entries) sees them
again, and an outage after the first contact is ridden through."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from test_redis_streams import RUN, VOCAB, make_group, make_streams, make_task, redis_config  # noqa: F401

from lpreg_core.config import RedisConfig
from lpreg_core.rollout import encode_group, encode_task
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.transport.redis_streams import RedisStreams

MAX_COMPLETION_TOKENS = 8


def completion(n: int, **fields: Any) -> rollout_pb2.Completion:
    args: dict[str, Any] = dict(
        token_ids=[5] * n, logprobs=[-0.5] * n, versions=[1] * n, reward=1.0,
        finish_reason=rollout_pb2.FINISH_REASON_STOP,
    )  # fmt: skip
    args.update(fields)
    return rollout_pb2.Completion(**args)


def forged(task: rollout_pb2.PromptTask, *completions: rollout_pb2.Completion) -> bytes:
    group = make_group(task)
    del group.completions[:]
    group.completions.extend(completions)
    return encode_group(group)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_poison_on_both_streams_is_dead_lettered_and_acked(
    redis_server: Any,
    make_streams: Callable[..., RedisStreams],  # noqa: F811
) -> None:
    config = redis_config(redis_server.url, max_entry_bytes=1 << 20)
    learner = make_streams("learner", config=config, max_completion_tokens=MAX_COMPLETION_TOKENS)
    generator = make_streams("gen-0", config=config)
    task = make_task("t-1")
    client = redis_server.client()
    poison_task = make_task("t-poison")
    poison_task.temperature = 1e-7
    client.xadd(learner.prompts_key, {b"data": encode_task(poison_task)})
    poisons = [
        forged(task, completion(3, versions=[2**63] * 3), completion(3)),
        forged(task, completion(4000), completion(4000)),  # the 48 KB group
        forged(task, completion(3, reward=3e38), completion(3)),
        forged(task, *[completion(1)] * 2000),
        forged(task, completion(3, logprobs=[-0.1, -1e30, -0.1]), completion(3)),
    ]
    for data in poisons:
        client.xadd(learner.rollouts_key, {b"data": data})
    assert generator.read_tasks(10, 50) == []
    assert learner.read_groups(10, 50, vocab_size=VOCAB) == []
    letters = learner.read_dead_letters()
    assert [(d.source, d.reason) for d in letters] == [
        ("prompts", "validate"),
        ("rollouts", "validate"),
        ("rollouts", "too_large"),
        ("rollouts", "validate"),
        ("rollouts", "too_large"),
        ("rollouts", "validate"),
    ]
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 0}
    # A restarted learner (same consumer name, as after --resume) replays nothing of them.
    restarted = make_streams("learner", config=config, max_completion_tokens=MAX_COMPLETION_TOKENS)
    assert restarted.read_groups(10, 50, vocab_size=VOCAB) == []
    assert restarted.dlq_length() == 6


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_operation_waits_out_a_redis_restart(
    redis_server: Any,
    make_streams: Callable[..., RedisStreams],  # noqa: F811
) -> None:
    """connect_retries=0 would fail the first try; once connected, the outage window
    (redis.outage_tolerance_s) keeps the operation retrying until the server is back."""
    config = redis_config(
        redis_server.url, connect_retries=0, retry_backoff_s=0.05, retry_backoff_max_s=0.5
    )
    streams = make_streams("learner", config=config)
    streams.set_version(3)
    redis_server.stop()
    restarted = threading.Timer(3.0, redis_server.start)
    restarted.start()
    try:
        assert streams.get_version() == 3  # blocks through the outage, then answers
    finally:
        restarted.join()
    assert streams.num_retries >= 1


def test_the_outage_window_is_at_least_a_minute() -> None:
    assert RedisConfig().outage_tolerance_s == 120.0
    with pytest.raises(ValueError, match="outage_tolerance_s"):
        RedisConfig(outage_tolerance_s=30.0)

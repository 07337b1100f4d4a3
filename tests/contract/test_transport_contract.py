"""The transport contract (lpreg_core.transport), run against every implementation: the real
Redis Streams adapter on a real redis-server, and the in-memory one the loop tests use. A
behaviour the in-memory transport gets wrong fails here, next to the same test on Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lpreg_core.config import RedisConfig
from lpreg_core.rollout import SCHEMA_VERSION
from lpreg_core.transport import LearnerTransport
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.transport import InMemoryState, InMemoryStreams, RedisStreams

RUN = "contract"
VOCAB = 50
CLAIM_IDLE_MS = 150
MAX_ENTRY_BYTES = 4096

Views = Callable[[str], LearnerTransport]


@pytest.fixture(params=["memory", "redis"])
def views(request: pytest.FixtureRequest) -> Iterator[Views]:
    """``views(consumer)``: a transport for one consumer; all views share one store."""
    opened: list[Any] = []
    if request.param == "memory":
        state = InMemoryState()

        def make(consumer: str) -> LearnerTransport:
            return InMemoryStreams(
                RUN,
                consumer,
                claim_idle_ms=CLAIM_IDLE_MS,
                max_entry_bytes=MAX_ENTRY_BYTES,
                state=state,
            )

    else:
        server = request.getfixturevalue("redis_server")
        config = RedisConfig(
            url=server.url,
            claim_idle_ms=CLAIM_IDLE_MS,
            block_ms=50,
            connect_retries=5,
            retry_backoff_s=0.02,
            max_entry_bytes=MAX_ENTRY_BYTES,
        )
        request.applymarker(pytest.mark.integration)

        def make(consumer: str) -> LearnerTransport:
            return RedisStreams(config, RUN, consumer)

    def view(consumer: str) -> LearnerTransport:
        t = make(consumer)
        t.connect()
        opened.append(t)
        return t

    yield view
    for t in opened:
        t.close()


def task(task_id: str, data_index: int = 0) -> rollout_pb2.PromptTask:
    return rollout_pb2.PromptTask(
        run_id=RUN,
        task_id=task_id,
        prompt_id=f"p-{task_id}",
        prompt="2+2=",
        answer="4",
        data_index=data_index,
        num_samples=2,
        issue_version=1,
        issued_at=1.0,
        temperature=1.0,
        max_new_tokens=4,
    )


def group(t: rollout_pb2.PromptTask) -> rollout_pb2.RolloutGroup:
    completion = rollout_pb2.Completion(
        token_ids=[7, 8], logprobs=[-0.25, -0.5], versions=[1, 1], reward=1.0
    )
    return rollout_pb2.RolloutGroup(
        run_id=RUN,
        rollout_id=f"r-{t.task_id}",
        task_id=t.task_id,
        prompt_id=t.prompt_id,
        generator_id="gen",
        data_index=t.data_index,
        issue_version=t.issue_version,
        prompt_token_ids=[1, 2],
        completions=[completion, completion],
        vocab_size=VOCAB,
    )


def read_groups(t: LearnerTransport, n: int) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < deadline:
        out += t.read_groups(n - len(out), 50, vocab_size=VOCAB)
    return out


def serve(gen: LearnerTransport, n: int) -> list[str]:
    """The generator side: answer ``n`` tasks; returns their task ids."""
    done = []
    for d in gen.read_tasks(n, 50):
        assert gen.publish_group_and_ack_task(group(d.value), d.entry_id) is not None
        done.append(d.value.task_id)
    return done


def test_task_to_group_round_trip_and_acks(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    ids = learner.issue_tasks([task("a"), task("b")])
    assert len(ids) == 2
    assert serve(gen, 2) == ["a", "b"]
    got = read_groups(learner, 2)
    assert [d.value.task_id for d in got] == ["a", "b"]
    assert all(d.value.schema_version == SCHEMA_VERSION for d in got)
    assert not any(d.redelivered for d in got)
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 2}
    assert learner.ack_groups([d.entry_id for d in got]) == 2
    assert learner.ack_groups([d.entry_id for d in got]) == 0  # acking twice is harmless
    assert learner.pending_counts() == {"prompts": 0, "rollouts": 0}
    assert learner.backlog() == {"prompts": 0, "rollouts": 0}


def test_the_first_publish_for_a_task_wins(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    learner.issue_tasks([task("a")])
    (d,) = gen.read_tasks(1, 50)
    assert gen.publish_group_and_ack_task(group(d.value), d.entry_id) is not None
    assert gen.publish_group_and_ack_task(group(d.value), d.entry_id) is None
    assert len(read_groups(learner, 1)) == 1
    assert learner.read_groups(1, 50, vocab_size=VOCAB) == []


def test_idle_tasks_of_a_dead_generator_are_reclaimed_not_earlier(views: Views) -> None:
    learner, dead, alive = views("learner"), views("gen-dead"), views("gen-alive")
    learner.issue_tasks([task("a")])
    (held,) = dead.read_tasks(1, 50)
    assert alive.read_tasks(1, 0) == []  # pending with its owner, not idle yet
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    (taken,) = alive.read_tasks(1, 50)
    assert taken.entry_id == held.entry_id and taken.redelivered
    assert alive.publish_group_and_ack_task(group(taken.value), taken.entry_id) is not None
    # The slow original owner cannot publish the same task a second time.
    assert dead.publish_group_and_ack_task(group(held.value), held.entry_id) is None


def test_own_tasks_in_progress_are_never_handed_out_again(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    learner.issue_tasks([task("a"), task("b")])
    first = gen.read_tasks(1, 50)
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    second = gen.read_tasks(2, 50)
    assert [d.value.task_id for d in first + second] == ["a", "b"]
    # Released tasks go back to the pool (reclaimed once idle), by anyone.
    gen.release_tasks([first[0].entry_id])
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    again = views("gen-1").read_tasks(1, 50)
    assert [d.value.task_id for d in again] == ["a"]


def test_acked_tasks_are_gone_for_good(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    learner.issue_tasks([task("a")])
    (d,) = gen.read_tasks(1, 50)
    assert gen.ack_tasks([d.entry_id]) == 1
    assert gen.ack_tasks([d.entry_id]) == 0
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    assert views("gen-1").read_tasks(1, 0) == []
    assert learner.backlog() == {"prompts": 0, "rollouts": 0}


def test_invalid_entries_are_dead_lettered_acked_and_never_returned(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    raw = getattr(learner, "add_raw_entry", None)
    if raw is None:  # RedisStreams: write the foreign entries as any Redis client could
        r = learner._redis  # type: ignore[attr-defined]
        r.xadd(learner.prompts_key, {b"data": b"\xff garbage"})  # type: ignore[attr-defined]
        r.xadd(learner.rollouts_key, {b"data": b"\x00\x01 not a group"})  # type: ignore[attr-defined]
    else:
        raw("prompts", b"\xff garbage")
        raw("rollouts", b"\x00\x01 not a group")
    learner.issue_tasks([task("ok")])
    assert [d.value.task_id for d in gen.read_tasks(5, 50)] == ["ok"]
    assert read_groups(learner, 1) == []
    assert learner.dlq_length() == 2
    assert learner.pending_counts() == {"prompts": 1, "rollouts": 0}


def test_a_restarted_learner_replays_exactly_its_unacked_groups(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    learner.issue_tasks([task(x) for x in "abcd"])
    serve(gen, 4)
    got = read_groups(learner, 4)
    learner.ack_groups([got[0].entry_id, got[1].entry_id])
    restarted = views("learner")
    replay = read_groups(restarted, 2)
    assert [d.value.task_id for d in replay] == ["c", "d"]
    assert all(d.redelivered for d in replay)
    learner.issue_tasks([task("e")])
    serve(gen, 1)
    new = read_groups(restarted, 1)
    assert [d.value.task_id for d in new] == ["e"] and not new[0].redelivered


def test_ledger_moves_with_the_issued_tasks(views: Views) -> None:
    learner = views("learner")
    assert learner.ledger() == {}
    learner.issue_tasks([task("a"), task("b")], ledger={"prompts_issued": 2, "next_data_index": 2})
    learner.issue_tasks([], ledger={"prompts_issued": 0, "groups_dropped_stale": 1})
    assert learner.ledger() == {
        "prompts_issued": 2,
        "next_data_index": 2,
        "groups_dropped_stale": 1,
    }


def test_backlog_counts_undelivered_and_pending_work(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    learner.issue_tasks([task(x) for x in "abc"])
    assert learner.backlog() == {"prompts": 3, "rollouts": 0}
    gen.read_tasks(1, 50)  # delivered, not done: still backlog
    assert learner.backlog() == {"prompts": 3, "rollouts": 0}
    serve(gen, 2)
    assert learner.backlog() == {"prompts": 1, "rollouts": 2}
    read_groups(learner, 2)
    assert learner.backlog() == {"prompts": 1, "rollouts": 2}
    assert learner.stream_lengths()["dlq"] == 0


def test_run_state_version_and_heartbeats(views: Views) -> None:
    learner = views("learner")
    assert learner.get_version() is None
    learner.set_version(7)
    assert learner.get_version() == 7
    learner.heartbeat("gen-b", 10.0)
    learner.heartbeat("gen-a", 0.05)
    assert learner.live_generators() == ["gen-a", "gen-b"]
    time.sleep(0.2)
    assert learner.live_generators() == ["gen-b"]


def test_reads_refuse_a_count_below_one(views: Views) -> None:
    learner = views("learner")
    with pytest.raises(ValueError, match="count"):
        learner.read_tasks(0, 10)
    with pytest.raises(ValueError, match="count"):
        learner.read_groups(0, 10, vocab_size=VOCAB)


def test_issued_tasks_are_recorded_with_the_issue_and_retired_with_the_ack(views: Views) -> None:
    learner, gen = views("learner"), views("gen-0")
    t = task("a", data_index=7)
    learner.issue_tasks([t, task("b")])
    assert learner.num_issued() == 2
    issued = learner.issued_tasks(["a", "never"])
    assert set(issued) == {"a"}
    assert (issued["a"].data_index, issued["a"].num_samples, issued["a"].max_new_tokens) == (
        7,
        2,
        4,
    )
    serve(gen, 2)
    got = read_groups(learner, 2)
    assert learner.ack_groups([got[0].entry_id], retire=["a"]) == 1
    assert learner.num_issued() == 1
    assert learner.issued_tasks(["a", "b"]).keys() == {"b"}
    # Retiring without an ack (a task whose group was dead-lettered) works too.
    assert learner.ack_groups([], retire=["b"]) == 0
    assert learner.num_issued() == 0


def test_dead_letters_are_recorded_with_their_reason(views: Views) -> None:
    learner = views("learner")
    learner.dead_letter(b"x", source="rollouts", reason="unexpected", detail="d", entry_id="1-0")
    assert learner.dlq_length() == 1

"""The learner loop driven without processes: in-memory transport, fake publisher, trainer,
checkpointer and clock. Each test runs in milliseconds."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lpreg_core.config import RunConfig
from lpreg_core.data import make_source
from lpreg_core.rollout import SCHEMA_VERSION
from lpreg_core.weight_sync import PublishResult
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.loop import LearnerLoop, RunStateExists
from services.learner.metrics import LearnerMetrics
from services.learner.registry import GeneratorRegistry
from services.transport.memory import InMemoryState, InMemoryStreams

RUN = "loop"
VOCAB = 19
B = 2  # prompt groups per step


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        self.now += timeout_s
        return event.is_set()


class FakePublisher:
    """Publishes to whoever the registry says is alive; remembers what it sent."""

    def __init__(self, registry: GeneratorRegistry) -> None:
        self.registry = registry
        self.epoch = 0
        self.last_published = -1
        self._members: list[str] = []
        self.published: list[tuple[int, list[str], bool]] = []

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def needs_epoch(self) -> bool:
        return sorted(g.generator_id for g in self.registry.alive()) != self._members

    def publish(self, version: int, timeout_s: float, wait_loaded: bool) -> PublishResult:
        if self.needs_epoch():
            self.epoch += 1
            self._members = sorted(g.generator_id for g in self.registry.alive())
        self.published.append((version, self.members, wait_loaded))
        self.last_published = version
        return PublishResult(version, self.members, {}, True)

    def close(self) -> None:
        pass


class FakeTrainer:
    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def train_step(self, groups: list[rollout_pb2.RolloutGroup]) -> dict[str, float]:
        self.steps.append([g.task_id for g in groups])
        rewards = [c.reward for g in groups for c in g.completions]
        return {
            "loss": 0.0,
            "entropy": 0.5,
            "reward_mean": sum(rewards) / len(rewards),
            "num_tokens": float(sum(len(c.token_ids) for g in groups for c in g.completions)),
        }


class MemoryCheckpointer:
    """Durable state as a list of JSON snapshots; ``crash_on_save`` simulates a crash mid-save."""

    def __init__(self) -> None:
        self.saved: list[tuple[int, dict[str, Any]]] = []
        self.crash_on_save = False

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.crash_on_save:
            raise RuntimeError("killed while checkpointing")
        self.saved.append((step, json.loads(json.dumps(state))))

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        return copy.deepcopy(self.saved[-1]) if self.saved else None


def make_config(**learner: Any) -> RunConfig:
    settings = {
        "prompts_per_step": B,
        "max_staleness": 1,
        "steps": 100,
        "eval_every_steps": 0,
        "min_generators": 0,
        "checkpoint": {"every_steps": 1},
        **learner,
    }
    return RunConfig.model_validate({"run_id": RUN, "learner": settings, "redis": {"block_ms": 1}})


class Harness:
    """One learner loop plus the generators' side of the same in-memory Redis."""

    def __init__(
        self,
        config: RunConfig,
        state: InMemoryState | None = None,
        checkpointer: MemoryCheckpointer | None = None,
    ) -> None:
        self.config = config
        self.clock = FakeClock()
        self.state = state or InMemoryState(clock=self.clock.monotonic)
        self.transport = InMemoryStreams(RUN, "learner", state=self.state, max_tokens=10_000)
        self.gen = self.transport.for_consumer("gen-0")
        self.registry = GeneratorRegistry(
            30.0, expected_vocab_size=VOCAB, clock=self.clock.monotonic
        )
        self.publisher = FakePublisher(self.registry)
        self.trainer = FakeTrainer()
        self.checkpointer = checkpointer or MemoryCheckpointer()
        self.loop = LearnerLoop(
            config,
            transport=self.transport,
            publisher=self.publisher,
            registry=self.registry,
            trainer=self.trainer,
            checkpointer=self.checkpointer,
            source=make_source(config.task),
            metrics=LearnerMetrics(CollectorRegistry(), RUN),
            vocab_size=VOCAB,
            clock=self.clock,
        )

    def answer(self, count: int, version: int | None = None) -> list[str]:
        """Generators answer up to ``count`` tasks sampled at ``version`` (default: current)."""
        v = self.loop.state.version if version is None else version
        done = []
        for d in self.gen.read_tasks(count, block_ms=0):
            group = rollout_pb2.RolloutGroup(
                run_id=RUN,
                rollout_id=f"r-{d.value.task_id}",
                task_id=d.value.task_id,
                prompt_id=d.value.prompt_id,
                generator_id="gen-0",
                data_index=d.value.data_index,
                issue_version=d.value.issue_version,
                prompt_token_ids=[1, 2, 3],
                vocab_size=VOCAB,
                completions=[
                    rollout_pb2.Completion(
                        token_ids=[4, 5],
                        logprobs=[-0.5, -0.5],
                        versions=[v, v],
                        reward=float(i % 2),
                        finish_reason=rollout_pb2.FINISH_REASON_STOP,
                    )
                    for i in range(d.value.num_samples)
                ],
            )
            assert self.gen.publish_group_and_ack_task(group, d.entry_id) is not None
            done.append(d.value.task_id)
        return done

    def prompts_waiting(self) -> int:
        return self.transport.backlog()["prompts"]


def started(config: RunConfig | None = None, **kw: Any) -> Harness:
    h = Harness(config or make_config(), **kw)
    h.loop.start()
    h.loop.issue()
    return h


def test_admission_bounds_outstanding_work_at_max_staleness_plus_one_steps() -> None:
    h = started(make_config(max_staleness=2))
    assert h.prompts_waiting() == 3 * B
    h.loop.issue()  # nothing more while all of it is outstanding
    assert h.prompts_waiting() == 3 * B
    h.answer(B)
    h.loop.step_once()
    # One step's groups were trained: exactly one step's worth more goes out.
    assert h.transport.backlog() == {"prompts": 3 * B, "rollouts": 0}
    assert h.loop.outstanding == 3 * B


def test_synchronous_admission_issues_one_step_and_waits_for_loads() -> None:
    h = started(make_config(max_staleness=0))
    assert h.prompts_waiting() == B
    h.answer(B)
    h.loop.step_once()
    assert h.publisher.published[-1] == (1, [], True)  # wait_loaded at max_staleness 0
    assert h.prompts_waiting() == B
    # The next step's prompts went out after the update, for the new version: issued while the
    # step's groups were still being collected they would have come back stale.
    assert [d.value.issue_version for d in h.gen.read_tasks(10, block_ms=0)] == [1] * B


def test_stale_groups_are_dropped_reissued_and_never_trained() -> None:
    h = started(make_config(max_staleness=1))
    h.loop.state.version = 5  # the policy moved on while these were sampled
    stale = h.answer(1, version=3)
    fresh = h.answer(B, version=5)
    record = h.loop.step_once()
    assert record is not None
    assert not set(stale) & set(h.trainer.steps[0])
    assert set(h.trainer.steps[0]) <= set(fresh)
    assert h.loop.state.counters["groups_dropped_stale"] == 1
    # The dropped prompt went out again under a new task id, same data position.
    issued_indices = [d.value.data_index for d in h.gen.read_tasks(100, block_ms=0)]
    assert 0 in issued_indices  # the first prompt (index 0) was the stale one
    summary = h.loop.summary(1.0)
    assert summary["prompts_unaccounted"] == 0


def test_groups_are_acked_only_after_a_durable_checkpoint() -> None:
    h = started(make_config(checkpoint={"every_steps": 2}))
    h.answer(B)
    h.loop.step_once()
    assert h.transport.pending_counts()["rollouts"] == B  # trained, not yet covered
    assert h.checkpointer.saved == []
    h.answer(B)
    h.checkpointer.crash_on_save = True
    with pytest.raises(RuntimeError, match="killed"):
        h.loop.step_once()
    # The checkpoint failed: nothing was acked, both steps' groups stay pending.
    assert h.transport.pending_counts()["rollouts"] == 2 * B
    h.checkpointer.crash_on_save = False
    h.loop.checkpoint()
    assert h.transport.pending_counts()["rollouts"] == 0
    assert h.checkpointer.saved[-1][0] == 2


def test_resume_replays_unacked_groups_and_dedupes_what_the_checkpoint_covers() -> None:
    # Staleness 1: the replayed groups were sampled by the checkpoint's own weights; the resumed
    # learner renumbers those weights (v2 becomes v4) but they are 0 steps away along the
    # lineage, not the 2 the renumbered version suggests, so they are trained, not dropped.
    config = make_config(max_staleness=1, checkpoint={"every_steps": 2})
    h = started(config)
    for _ in range(2):
        h.answer(B)
        h.loop.step_once()  # step 2 checkpoints and acks
    h.answer(B)
    h.loop.step_once()  # step 3 trained, not checkpointed: its groups stay pending
    lost = set(h.trainer.steps[2])
    published_before = h.transport.get_version()
    # The learner dies; a new one resumes against the same Redis and checkpoint.
    r = Harness(config, state=h.state, checkpointer=h.checkpointer)
    assert r.loop.restore()
    r.loop.start()
    assert r.loop.state.step == 2
    assert r.loop.state.version == published_before + 1  # never repeats a published version
    r.loop.issue()
    # A copy of a group the checkpoint already covers (a forged or doubled publish) arrives too.
    covered = sorted(r.loop.state.trained_tasks)[0]
    forged = rollout_pb2.RolloutGroup(
        schema_version=SCHEMA_VERSION,
        run_id=RUN,
        rollout_id="forged",
        task_id=covered,
        prompt_id="p",
        generator_id="gen-1",
        data_index=0,
        prompt_token_ids=[1],
        vocab_size=VOCAB,
        completions=[
            rollout_pb2.Completion(token_ids=[4], logprobs=[-1.0], versions=[r.loop.state.version])
        ],
    )
    r.transport.add_raw_entry("rollouts", forged.SerializeToString())
    for _ in range(2):
        r.answer(B)
        r.loop.step_once()
    # The replayed groups of step 3 come first and are trained again (the checkpoint lacks them).
    assert set(r.trainer.steps[0]) == lost
    # The copy is counted as a duplicate and acked, never trained.
    assert r.loop.metrics.groups_duplicate._value.get() == 1
    assert all(covered not in step for step in r.trainer.steps)


def test_a_second_learner_without_resume_refuses_a_run_with_state() -> None:
    h = started()
    other = Harness(make_config(), state=h.state)
    with pytest.raises(RunStateExists, match="--resume"):
        other.loop.start()


def test_resume_after_many_restarts_does_not_inflate_admission() -> None:
    """Each resume skips versions; admission counts work, so the backlog stays bounded."""
    config = make_config(max_staleness=1)
    h = started(config)
    state, ckpt = h.state, h.checkpointer
    for _ in range(5):
        h.answer(B)
        h.loop.step_once()
        h = Harness(config, state=state, checkpointer=ckpt)
        h.loop.restore()
        h.loop.start()
        h.loop.issue()
        assert sum(h.transport.backlog().values()) <= 2 * B
    assert h.loop.state.version > h.loop.state.step  # versions were skipped


def connect(registry: GeneratorRegistry, generator_id: str) -> tuple[str, threading.Event]:
    """Register and attach a Control stream (consumed on a thread, as the gRPC servicer would);
    set the returned event to drop the stream."""
    info = registry.register(generator_id, "hf", 1, VOCAB, "cpu")
    gone = threading.Event()
    stream = registry.events(generator_id, info.session_id, lambda: not gone.is_set())
    threading.Thread(target=lambda: list(stream), daemon=True).start()
    for _ in range(200):
        if any(g.generator_id == generator_id for g in registry.alive()):
            break
        gone.wait(0.01)
    return info.session_id, gone


def test_generator_loss_and_rejoin_start_new_epochs() -> None:
    h = started()
    session, gone = connect(h.registry, "gen-0")
    h.answer(B)
    h.loop.step_once()
    assert h.publisher.published[-1][1] == ["gen-0"]
    epoch = h.publisher.epoch
    # gen-0 vanishes: its stream drops, its heartbeats stop; the next publish goes to nobody.
    gone.set()
    h.clock.now += 60
    h.answer(B)
    h.loop.step_once()
    assert h.publisher.published[-1][1] == []
    assert h.publisher.epoch == epoch + 1
    # It comes back (a new session); while the learner waits for rollouts it is brought up to the
    # current version at once, in a new epoch.
    assert connect(h.registry, "gen-0")[0] != session
    h.loop.refresh_membership()
    assert h.publisher.published[-1] == (h.loop.state.version, ["gen-0"], False)
    assert h.publisher.epoch == epoch + 2


def test_a_full_run_finishes_with_every_prompt_accounted_for() -> None:
    config = make_config(steps=6, max_staleness=1, checkpoint={"every_steps": 4})
    h = Harness(config)
    h.loop.start()

    # The loop blocks on the transport; drive the generators from the loop's own wait.
    original = h.transport.read_groups

    def read_groups(count: int, block_ms: int, *, vocab_size: int | None) -> Any:
        h.answer(count)
        return original(count, block_ms, vocab_size=vocab_size)

    h.transport.read_groups = read_groups  # type: ignore[method-assign]
    summary = h.loop.run()
    assert summary["steps"] == 6
    assert summary["groups_trained"] == 6 * B
    assert summary["prompts_unaccounted"] == 0
    assert h.transport.pending_counts()["rollouts"] == 0  # the final checkpoint acked all
    assert [v for v, _, _ in h.publisher.published] == list(range(1, 7))


def test_resume_against_an_empty_redis_reissues_what_was_outstanding() -> None:
    """A checkpointed run restarted with a new (empty) Redis must neither hang nor lose prompts."""
    config = make_config(max_staleness=1, checkpoint={"every_steps": 1})
    h = started(config)
    h.answer(B)
    h.loop.step_once()
    outstanding = sorted(d.value.data_index for d in h.gen.read_tasks(100, block_ms=0))
    assert len(outstanding) == 2 * B
    fresh = Harness(config, checkpointer=h.checkpointer)  # a new InMemoryState: nothing in it
    assert fresh.loop.restore()
    fresh.loop.start()
    reissued = sorted(d.value.data_index for d in fresh.gen.read_tasks(100, block_ms=0))
    assert reissued == outstanding
    assert fresh.loop.summary(1.0)["prompts_unaccounted"] == 0


def test_a_crash_between_checkpoint_and_ack_does_not_stall_admission() -> None:
    """The checkpoint covers a step whose ack (and task retirement) never happened: on resume
    those tasks are done, not outstanding, and admission issues new work."""
    config = make_config(max_staleness=0, checkpoint={"every_steps": 1})
    h = started(config)
    h.answer(B)
    original = h.transport.ack_groups

    def die(entry_ids: Any, *, retire: Any = ()) -> int:
        raise RuntimeError("killed after the checkpoint, before the ack")

    h.transport.ack_groups = die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="before the ack"):
        h.loop.step_once()
    h.transport.ack_groups = original  # type: ignore[method-assign]
    assert h.transport.num_issued() == B  # the trained step's tasks were never retired
    r = Harness(config, state=h.state, checkpointer=h.checkpointer)
    assert r.loop.restore()
    r.loop.start()
    assert r.transport.num_issued() == 0
    r.loop.issue()
    assert r.transport.num_issued() == B  # the next step's prompts went out
    r.answer(B)
    r.loop.step_once()  # the replayed groups are duplicates: acked, never trained again
    assert r.loop.metrics.groups_duplicate._value.get() == B
    assert r.loop.summary(1.0)["prompts_unaccounted"] == 0


def test_a_forged_group_read_beside_the_real_one_resolves_its_task_once() -> None:
    """A forged group for an issued task is dead-lettered and the prompt re-issued; the genuine
    group for the same task, read in the same batch, is then no longer what was asked for."""
    h = started(make_config(max_staleness=1))
    (d,) = h.gen.read_tasks(1, block_ms=0)
    forged = rollout_pb2.RolloutGroup(
        schema_version=SCHEMA_VERSION,
        run_id=RUN,
        rollout_id="forged",
        task_id=d.value.task_id,
        prompt_id="p",
        generator_id="forger",
        data_index=d.value.data_index,
        prompt_token_ids=[1],
        vocab_size=VOCAB,
        completions=[
            rollout_pb2.Completion(token_ids=[4], logprobs=[-1.0], versions=[99])
            for _ in range(d.value.num_samples)
        ],
    )
    h.transport.add_raw_entry("rollouts", forged.SerializeToString())
    h.gen.release_tasks([d.entry_id])
    h.clock.now += 100  # the task goes idle and back to the pool: answer everything
    h.answer(3 * B)
    h.loop.step_once()
    h.loop.checkpoint()
    summary = h.loop.summary(1.0)
    assert summary["groups_dead_lettered"] == 1
    assert summary["prompts_unaccounted"] == 0
    assert h.transport.dlq_length() == 2  # the forged group, then the late genuine one

"""The learner's loop: issue prompt tasks under admission, collect fresh rollout groups, train,
publish, checkpoint, and only then acknowledge.

The loop decides; it does not wire. It takes its transport (``lpreg_core.transport``), weight
publisher (``lpreg_core.weight_sync``), trainer, checkpointer and clock as arguments and imports no
Redis, gRPC or socket module, so a unit test drives it in milliseconds with the in-memory transport,
fakes and a fake clock (tests/unit/test_learner_loop.py). ``services.learner.main`` builds the real
parts and runs it.

Delivery semantics (docs/design.md, section 3): rollout groups are acknowledged only once a checkpoint that
includes their update is durable, so a learner restarted with resume replays exactly the groups
its checkpoint does not cover; groups are deduplicated by task id. Stale groups are re-issued
before they are acknowledged, so a crash in between re-drops a group instead of losing it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from lpreg_core.config import RunConfig
from lpreg_core.data import PromptSource
from lpreg_core.rollout import SCHEMA_VERSION, group_policy_versions
from lpreg_core.staleness import StalenessPolicy, lineage_distance
from lpreg_core.transport import IssuedTask, LearnerTransport
from lpreg_core.weight_sync import WeightPublisher
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.loop_parts import (
    Checkpointer,
    Clock,
    LoopState,
    PolicyTrainer,
    RunStateExists,
    SystemClock,
)
from services.learner.metrics import LearnerMetrics
from services.learner.registry import GeneratorRegistry

log = logging.getLogger("lpreg.learner")


class LearnerLoop:
    """Issue, collect, train, publish, checkpoint, ack; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        *,
        transport: LearnerTransport,
        publisher: WeightPublisher,
        registry: GeneratorRegistry,
        trainer: PolicyTrainer,
        checkpointer: Checkpointer,
        source: PromptSource,
        metrics: LearnerMetrics,
        vocab_size: int,
        clock: Clock | None = None,
        evaluate: Callable[[], float] | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.publisher = publisher
        self.registry = registry
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.source = source
        self.metrics = metrics
        self.vocab_size = vocab_size
        self.clock = clock or SystemClock()
        self.evaluate = evaluate
        self.on_record = on_record
        self.policy = StalenessPolicy(config.learner.prompts_per_step, config.learner.max_staleness)
        self.state = LoopState()
        self.stop = threading.Event()
        # (entry id, task id) of groups trained since the last checkpoint; task id None for a
        # duplicate (nothing to retire).
        self.pending_acks: list[tuple[str, str | None]] = []
        # (entry id, task id) of the groups collected for the step being assembled.
        self._collected: list[tuple[str, str | None]] = []
        self.resumed = False
        self._reissue_lost: list[int] = []
        self._observed_generators: set[str] = set()
        self._observed_lock = threading.Lock()

    # -- start-up -----------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest checkpoint, if any; returns whether one was found."""
        restored = self.checkpointer.restore()
        self.resumed = True
        if restored is None:
            return False
        step, raw = restored
        self.state = LoopState.from_json(step, raw)
        log.info("resumed at step %d, version %d", self.state.step, self.state.version)
        return True

    def start(self) -> None:
        """Connect, take the issuer's position from the transport, fix the version to publish."""
        self.transport.connect()
        self._adopt_ledger()
        published = self.transport.get_version()
        s = self.state
        if self.resumed and published is not None and published >= s.version:
            # Versions past the checkpoint were published by the lost process: the restored
            # weights get a fresh number, so the version sequence never repeats or goes back.
            log.info(
                "restored weights become v%d (v%d was published before)", published + 1, published
            )
            s.aliases.append((published + 1, s.version))
            s.version = published + 1
        self.transport.set_version(s.version)
        self.metrics.policy_version.set(s.version)
        # Tasks the checkpoint trained whose retirement was lost with the previous process are
        # not outstanding work: retire them now, or admission would count them for ever.
        done = [t for t in self.transport.all_issued() if t in s.trained_tasks]
        if done:
            self.transport.ack_groups([], retire=done)
        if self._reissue_lost:
            # The new store starts from the checkpoint's ledger; the lost prompts count like
            # dropped groups (their first issue is in those counters) and go out again.
            self.transport.issue_tasks(
                [],
                ledger={
                    "prompts_issued": s.counters["prompts_issued"],
                    "next_data_index": s.next_data_index,
                    "issued_fresh": s.issued_fresh,
                    "groups_dropped_stale": s.counters["groups_dropped_stale"],
                    "groups_dead_lettered": s.counters.get("groups_dead_lettered", 0),
                },
            )
            self.issue(self._reissue_lost)
            self._reissue_lost = []
        self.metrics.max_staleness.set(self.policy.max_staleness)

    def _adopt_ledger(self) -> None:
        """Take the issuer's position and counters from the transport, where they moved in step
        with the tasks actually issued (the checkpoint may be older)."""
        ledger = self.transport.ledger()
        if not ledger:
            lost = self.state.outstanding_indices if self.resumed else []
            if lost:
                log.warning(
                    "Redis holds no state of run %r (a new or emptied Redis): the %d prompts "
                    "outstanding at the checkpoint are issued again",
                    self.config.run_id,
                    len(lost),
                )
                self._reissue_lost = list(lost)
            return
        if not self.resumed:
            raise RunStateExists(
                f"run {self.config.run_id!r} already has state in Redis; continue it with "
                "`lpreg learner --resume`, or pick a new run_id"
            )
        s = self.state
        s.next_data_index = ledger.get("next_data_index", 0)
        s.issued_fresh = ledger.get("issued_fresh", 0)
        s.counters["prompts_issued"] = ledger.get("prompts_issued", 0)
        s.counters["groups_dropped_stale"] = ledger.get("groups_dropped_stale", 0)
        s.counters["groups_dead_lettered"] = ledger.get("groups_dead_lettered", 0)
        log.info("issuer state from the transport: %s", ledger)

    def wait_for_generators(self) -> None:
        want = self.config.learner.min_generators
        timeout_s = self.config.learner.min_generators_timeout_s
        deadline = self.clock.monotonic() + timeout_s
        while len(self.registry.alive()) < want and not self.stop.is_set():
            if self.clock.monotonic() > deadline:
                log.warning(
                    "%d of %d generators registered after %.0fs; starting anyway",
                    len(self.registry.alive()),
                    want,
                    timeout_s,
                )
                return
            self.clock.wait(self.stop, 0.2)
        log.info("%d generator(s) registered", len(self.registry.alive()))

    # -- prompts ------------------------------------------------------------------------------
    def _task(self, data_index: int) -> rollout_pb2.PromptTask:
        item = self.source.at(data_index)
        s = self.config.sampling
        return rollout_pb2.PromptTask(
            schema_version=SCHEMA_VERSION,
            run_id=self.config.run_id,
            task_id=uuid.uuid4().hex,
            prompt_id=item.problem.prompt_id,
            prompt=item.problem.prompt,
            answer=item.problem.answer,
            data_index=data_index,
            epoch=item.epoch,
            num_samples=s.num_samples,
            issue_version=self.state.version,
            issued_at=self.clock.time(),
            temperature=s.temperature,
            max_new_tokens=s.max_new_tokens,
        )

    def issue(
        self, reissue: list[int] | None = None, *, retiring: int = 0, dead_lettered: int = 0
    ) -> int:
        """Re-issue prompts whose groups were dropped or dead-lettered, and issue new ones up to
        the admission limit; returns how many tasks went out. ``retiring`` tasks are about to be
        retired (their groups are resolved but not yet acked). The ledger moves in the same
        transaction, so a restarted learner neither loses nor repeats a data position."""
        reissue = reissue or []
        s = self.state
        outstanding = self.transport.num_issued() - self._resolved_unacked() - retiring
        n = self.policy.num_to_issue(max(0, outstanding) + len(reissue))
        indices = range(s.next_data_index, s.next_data_index + n)
        tasks = [self._task(i) for i in [*reissue, *indices]]
        if not tasks:
            return 0
        ledger = {
            "prompts_issued": len(tasks),
            "next_data_index": n,
            "issued_fresh": n,
            "groups_dropped_stale": len(reissue) - dead_lettered,
            "groups_dead_lettered": dead_lettered,
        }
        self.transport.issue_tasks(tasks, ledger=ledger)
        s.next_data_index += n
        s.issued_fresh += n
        s.counters["prompts_issued"] += len(tasks)
        s.counters["groups_dropped_stale"] += len(reissue) - dead_lettered
        s.counters["groups_dead_lettered"] = (
            s.counters.get("groups_dead_lettered", 0) + dead_lettered
        )
        self.metrics.prompts_issued.inc(len(tasks))
        self.metrics.groups_dropped_stale.inc(len(reissue) - dead_lettered)
        return len(tasks)

    def _resolved_unacked(self) -> int:
        """Groups trained (their tasks resolved) whose ack and retirement wait for a checkpoint."""
        return sum(1 for _, task_id in self.pending_acks if task_id is not None)

    @property
    def outstanding(self) -> int:
        """Prompt groups issued and not yet trained, dropped or dead-lettered."""
        return max(0, self.transport.num_issued() - self._resolved_unacked())

    def _unexpected(self, g: rollout_pb2.RolloutGroup, issued: IssuedTask | None) -> str | None:
        """Why a well-formed group is not what the learner asked for, or None."""
        if issued is None:
            return f"task {g.task_id!r} was never issued by this run or is already done"
        if g.data_index != issued.data_index:
            return f"data_index {g.data_index}, but the task was issued for {issued.data_index}"
        if len(g.completions) != issued.num_samples:
            return f"{len(g.completions)} completions; the task asked for {issued.num_samples}"
        longest = max((len(c.token_ids) for c in g.completions), default=0)
        if longest > issued.max_new_tokens:
            return f"a completion of {longest} tokens; the task allowed {issued.max_new_tokens}"
        _, newest = group_policy_versions(g)
        if newest > self.state.version:
            return f"tokens of policy version {newest}, ahead of the learner's {self.state.version}"
        return None

    # -- rollouts -----------------------------------------------------------------------------
    def collect(self) -> list[rollout_pb2.RolloutGroup]:
        """Block until prompts_per_step fresh groups are in (or stop). Groups that are not what
        was issued are dead-lettered, stale ones dropped; both have their prompts re-issued.
        Duplicates (a replay of a group already trained) are acked with the rest."""
        need = self.config.learner.prompts_per_step
        groups: list[rollout_pb2.RolloutGroup] = []
        seen: set[str] = set()
        while len(groups) < need and not self.stop.is_set():
            self.refresh_membership()
            with self.metrics.waiting_for_rollouts():
                deliveries = self.transport.read_groups(
                    need - len(groups), self.config.redis.block_ms, vocab_size=self.vocab_size
                )
            issued = self.transport.issued_tasks([d.value.task_id for d in deliveries])
            reissue: list[int] = []
            done: list[str] = []  # entries acked now: dropped or dead-lettered
            retire: list[str] = []
            dead = 0
            for d in deliveries:
                g = d.value
                if g.task_id in self.state.trained_tasks or g.task_id in seen:
                    self.metrics.groups_duplicate.inc()
                    # A replay of a group the checkpoint covers (the learner died between the
                    # checkpoint and its ack): its task is done, retire it with the ack.
                    done_task = g.task_id if g.task_id in self.state.trained_tasks else None
                    self.pending_acks.append((d.entry_id, done_task))
                    continue
                info = issued.get(g.task_id)
                problem = self._unexpected(g, info)
                if problem is not None:
                    self.transport.dead_letter(
                        g.SerializeToString(),
                        source="rollouts",
                        reason="unexpected",
                        detail=f"{problem} (issued={info is not None})",
                        entry_id=d.entry_id,
                    )
                    done.append(d.entry_id)
                    if info is not None:  # an issued prompt is never lost: ask again
                        reissue.append(info.data_index)
                        retire.append(g.task_id)
                        dead += 1
                        # The task is resolved: another group for it in this read is not
                        # what was asked for either.
                        issued.pop(g.task_id)
                    continue
                assert info is not None
                age = self._age(g)
                if self.policy.too_far(age):
                    reissue.append(info.data_index)
                    done.append(d.entry_id)
                    retire.append(g.task_id)
                    issued.pop(g.task_id)
                    self._count_tokens("wasted", g)
                    continue
                self.metrics.rollout_staleness.observe(age)
                seen.add(g.task_id)
                groups.append(g)
                # Acked (and its task retired) with the first checkpoint after it is trained;
                # until then it is outstanding work.
                self._collected.append((d.entry_id, g.task_id))
            # Re-issue before acking: a crash in between re-drops a group, never loses a prompt.
            self.issue(reissue, retiring=len(retire), dead_lettered=dead)
            if done:
                self.transport.ack_groups(done, retire=retire)
        return groups

    def _age(self, g: rollout_pb2.RolloutGroup) -> int:
        """How many policy versions behind the current weights the group's farthest tokens
        are, along the weights' lineage (a resume renumbers versions without moving them)."""
        oldest, newest = group_policy_versions(g)
        s = self.state
        return max(
            lineage_distance(s.version, oldest, s.aliases),
            lineage_distance(s.version, newest, s.aliases),
        )

    def _count_tokens(self, kind: str, g: rollout_pb2.RolloutGroup) -> None:
        """Generated tokens by fate: "trained" or "wasted" (sampled, never trained)."""
        n = sum(len(c.token_ids) for c in g.completions)
        key = f"tokens_{kind}"
        self.state.counters[key] = self.state.counters.get(key, 0) + n
        if kind == "wasted":
            self.metrics.tokens_wasted.inc(n)

    def refresh_membership(self) -> None:
        """Bring generators that joined (or came back) up to the current version while waiting."""
        if self.publisher.needs_epoch() and self.registry.alive():
            self.publisher.publish(
                self.state.version, self.config.learner.publish_timeout_s, wait_loaded=False
            )

    # -- one step -----------------------------------------------------------------------------
    def train(self, groups: list[rollout_pb2.RolloutGroup], waited_s: float) -> dict[str, Any]:
        """Train on ``groups``, publish the new version; returns the step's record."""
        s = self.state
        t0 = self.clock.monotonic()
        stats = self.trainer.train_step(groups)
        self.pending_acks += self._collected
        self._collected = []
        train_s = self.clock.monotonic() - t0
        s.step += 1
        s.version += 1
        self.metrics.policy_version.set(s.version)
        self.transport.set_version(s.version)
        for g in groups:
            s.trained_tasks.add(g.task_id)
            self._count_tokens("trained", g)
        s.counters["groups_trained"] += len(groups)
        self.metrics.zero_advantage_groups.inc(
            sum(1 for g in groups if len({c.reward for c in g.completions}) <= 1)
        )
        t1 = self.clock.monotonic()
        result = self.publisher.publish(
            s.version, self.config.learner.publish_timeout_s, wait_loaded=self.policy.synchronous
        )
        publish_s = self.clock.monotonic() - t1
        oldest = [group_policy_versions(g)[0] for g in groups]
        step_s = waited_s + train_s + publish_s
        record: dict[str, Any] = {
            "step": s.step,
            "version": s.version,
            **{k: float(f"{v:.6g}") for k, v in stats.items()},
            "staleness_mean": sum(s.version - 1 - v for v in oldest) / max(1, len(oldest)),
            "groups_dropped_stale": s.counters["groups_dropped_stale"],
            # Running totals (they survive resumes): waste over any window of steps is the
            # difference of two rows.
            "tokens_trained_total": s.counters.get("tokens_trained", 0),
            "tokens_wasted_total": s.counters.get("tokens_wasted", 0),
            "wait_s": round(waited_s, 4),
            "train_s": round(train_s, 4),
            "publish_s": round(publish_s, 4),
            "publish_ok": result.ok,
            "members": len(result.members),
            "tokens_per_s": round(stats.get("num_tokens", 0.0) / max(1e-9, step_s), 2),
            "time": self.clock.time(),
        }
        self._observe_step(stats, len(groups), waited_s, train_s, publish_s)
        return record

    def _observe_step(
        self,
        stats: dict[str, float],
        num_groups: int,
        waited_s: float,
        train_s: float,
        publish_s: float,
    ) -> None:
        m = self.metrics
        m.steps.inc()
        m.step_seconds.observe(waited_s + train_s + publish_s)
        m.step_phase_seconds.labels(phase="wait_rollouts").observe(waited_s)
        m.step_phase_seconds.labels(phase="forward_backward").observe(train_s)
        m.step_phase_seconds.labels(phase="publish").observe(publish_s)
        m.regularized_tokens.inc(stats.get("num_regularized", 0.0))
        m.candidate_tokens.inc(stats.get("num_candidates", 0.0))
        m.lpreg_kl.set(stats.get("loss_kl", 0.0))
        m.entropy.set(stats.get("entropy", 0.0))
        m.reward_mean.set(stats.get("reward_mean", 0.0))
        m.loss.set(stats.get("loss", 0.0))
        m.pg_clipfrac.set(stats.get("pg_clipfrac", 0.0))
        m.ppo_kl.set(stats.get("ppo_kl", 0.0))
        m.grad_norm.set(stats.get("grad_norm", 0.0))
        m.learning_rate.set(stats.get("lr", 0.0))
        m.groups_trained.inc(num_groups)
        m.tokens_trained.inc(stats.get("num_tokens", 0.0))

    def observe_pipeline(self) -> None:
        """Stream depths, the autoscaling backlog and generator versions, for the dashboards.
        Called every step and on a timer (``services.learner.main``), so it is thread-safe."""
        m = self.metrics
        try:
            for stream, n in self.transport.stream_lengths().items():
                m.stream_length.labels(stream=stream).set(n)
            for stream, n in self.transport.pending_counts().items():
                m.stream_pending.labels(stream=stream).set(n)
            m.set_backlog(self.transport.undelivered())
        except Exception as e:  # metrics must not stop training
            log.debug("stream metrics unavailable: %s", e)
        alive = {g.generator_id for g in self.registry.alive()}
        m.generators.labels(state="alive").set(len(alive))
        m.generators.labels(state="member").set(len(self.publisher.members))
        with self._observed_lock:
            for gid, v in self.registry.loaded_versions().items():
                if gid in alive:
                    m.generator_weight_version.labels(generator=gid).set(v)
            # A departed generator's series would keep its last value (and alerts) for ever.
            for gid in self._observed_generators - alive:
                m.forget_generator(gid)
            self._observed_generators = alive

    def checkpoint(self) -> None:
        """Make the trainer state durable, then ack every group it covers."""
        t = self.clock.monotonic()
        trained = {task for _, task in self.pending_acks if task is not None}
        self.state.outstanding_indices = sorted(
            info.data_index
            for task, info in self.transport.all_issued().items()
            if task not in trained
        )
        self.checkpointer.save(self.state.step, self.state.to_json())
        self.metrics.checkpoint_written(self.clock.time())
        # Only now are the groups trained so far safe to forget, and their tasks done.
        if self.pending_acks:
            self.transport.ack_groups(
                [e for e, _ in self.pending_acks],
                retire=[t for _, t in self.pending_acks if t is not None],
            )
            self.pending_acks = []
        elapsed = self.clock.monotonic() - t
        self.metrics.checkpoint_seconds.observe(elapsed)
        self.metrics.step_phase_seconds.labels(phase="checkpoint").observe(elapsed)

    def _evaluate(self) -> float:
        assert self.evaluate is not None
        accuracy = self.evaluate()
        self.metrics.eval_accuracy.set(accuracy)
        return accuracy

    def _record(self, record: dict[str, Any]) -> None:
        every = self.config.learner.eval_every_steps
        done = self.state.step == self.config.learner.steps
        if self.evaluate is not None and every and (self.state.step % every == 0 or done):
            record["eval_accuracy"] = self._evaluate()
        self.state.history.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def step_once(self) -> dict[str, Any] | None:
        """Collect, train, publish, maybe checkpoint, issue more; None when stopped first."""
        t = self.clock.monotonic()
        groups = self.collect()
        if self.stop.is_set():
            return None
        record = self.train(groups, self.clock.monotonic() - t)
        self._record(record)
        self.observe_pipeline()
        every = self.config.learner.checkpoint.every_steps
        if self.state.step % every == 0 or self.state.step >= self.config.learner.steps:
            self.checkpoint()
        self.issue()
        return record

    # -- the run ------------------------------------------------------------------------------
    def evaluate_before_training(self) -> None:
        s = self.state
        if (
            self.evaluate is not None
            and self.config.learner.eval_every_steps
            and s.step == 0
            and "eval_accuracy_start" not in s.extra
        ):
            s.extra["eval_accuracy_start"] = self._evaluate()
            log.info("greedy eval accuracy before training: %.3f", s.extra["eval_accuracy_start"])

    def run(self) -> dict[str, Any]:
        """From start-up to the final publish; returns the run's summary."""
        start = self.clock.monotonic()
        self.evaluate_before_training()
        self.wait_for_generators()
        self.issue()
        while self.state.step < self.config.learner.steps and not self.stop.is_set():
            record = self.step_once()
            if record is None:
                break
            log.info(
                "step %d v%d reward %.3f entropy %.3f reg %d",
                record["step"],
                record["version"],
                record.get("reward_mean", 0.0),
                record.get("entropy", 0.0),
                int(record.get("num_regularized", 0)),
            )
        self.finish()
        return self.summary(self.clock.monotonic() - start)

    def finish(self) -> None:
        """Checkpoint what is not yet covered, bring every generator to the final version."""
        if self.pending_acks:
            self.checkpoint()
        s = self.state
        if self.publisher.last_published != s.version or self.publisher.needs_epoch():
            self.publisher.publish(s.version, self.config.learner.publish_timeout_s, False)
        members = [g.generator_id for g in self.registry.alive()]
        self.registry.wait_loaded(s.version, members, self.config.learner.final_publish_wait_s)

    def summary(self, wall_s: float) -> dict[str, Any]:
        s = self.state
        history = s.history
        first = history[0] if history else {}
        last = history[-1] if history else {}
        fifth = max(1, len(history) // 5)

        def mean(rows: list[dict[str, Any]], key: str) -> float | None:
            vals = [r[key] for r in rows if key in r]
            return round(sum(vals) / len(vals), 4) if vals else None

        evals = [r["eval_accuracy"] for r in history if "eval_accuracy" in r]
        dlq = self.transport.dlq_length()
        backlog = self.transport.backlog()
        outstanding = self.outstanding
        dead = s.counters.get("groups_dead_lettered", 0)
        wasted = s.counters.get("tokens_wasted", 0)
        trained_tokens = s.counters.get("tokens_trained", 0)
        return {
            "run_id": self.config.run_id,
            "steps": s.step,
            "policy_version": s.version,
            "prompts_issued": s.counters["prompts_issued"],
            "groups_trained": s.counters["groups_trained"],
            "groups_dropped_stale": s.counters["groups_dropped_stale"],
            "rollouts_in_dlq": dlq,
            "groups_dead_lettered": dead,
            "tokens_trained": trained_tokens,
            "tokens_wasted": wasted,
            "wasted_fraction": round(wasted / max(1, wasted + trained_tokens), 4),
            "prompts_trained": len(s.trained_tasks),
            "prompts_outstanding": outstanding,
            "backlog": {**backlog, "pending": self.transport.pending_counts()},
            "prompts_unaccounted": s.counters["prompts_issued"]
            - len(s.trained_tasks)
            - s.counters["groups_dropped_stale"]
            - dead
            - outstanding,
            "generator_weight_versions": dict(sorted(self.registry.loaded_versions().items())),
            "reward_mean_first": first.get("reward_mean"),
            "reward_mean_last": last.get("reward_mean"),
            "reward_mean_first_fifth": mean(history[:fifth], "reward_mean"),
            "reward_mean_last_fifth": mean(history[-fifth:], "reward_mean"),
            "entropy_first": first.get("entropy"),
            "entropy_last": last.get("entropy"),
            "eval_accuracy_start": s.extra.get("eval_accuracy_start"),
            "eval_accuracy_first": evals[0] if evals else None,
            "eval_accuracy_last": evals[-1] if evals else None,
            "num_regularized_total": sum(r.get("num_regularized", 0) for r in history),
            "wall_s": round(wall_s, 2),
        }

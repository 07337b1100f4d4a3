"""The learner service: issue prompt tasks, train on rollout groups, publish weights, checkpoint.

    lpreg learner CONFIG [--resume] [--set section.field=value ...]

Delivery semantics (DESIGN.md): rollout groups are acknowledged in Redis only once a checkpoint
that includes their update is durable, so a crashed learner restarted with --resume replays
exactly the groups its checkpoint does not cover; groups are deduplicated by task id.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from lpreg_core.config import RunConfig, dump_config
from lpreg_core.data import make_source
from lpreg_core.rollout import SCHEMA_VERSION, group_policy_versions
from lpreg_core.staleness import Admission, is_stale, staleness
from lpreg_core.weights import dtype_from_name
from lpreg_core.wire.lpreg.v1 import control_pb2, rollout_pb2
from services.common.auth import load_auth_token
from services.common.broadcast import WeightSender
from services.common.env import redis_password, redis_url
from services.common.grpc_server import build_server
from services.common.metrics import serve_metrics
from services.common.redis_streams import RedisStreams
from services.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from services.learner.control import LearnerControlServicer
from services.learner.evaluate import greedy_accuracy
from services.learner.metrics import LearnerMetrics
from services.learner.publisher import WeightPublisher
from services.learner.registry import GeneratorRegistry
from services.learner.trainer import Trainer, build_batch

log = logging.getLogger("lpreg.learner")


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.local.run_dir.format(run_id=config.run_id))


class Learner:
    def __init__(self, config: RunConfig, *, resume: bool = False) -> None:
        self.config = config
        self.run_dir = run_dir_of(config)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        torch.set_num_threads(config.learner.num_threads)
        torch.manual_seed(config.learner.seed)
        self.stop = threading.Event()
        self.registry_prom = CollectorRegistry()
        self.metrics = LearnerMetrics(self.registry_prom, config.run_id)
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model.path, dtype=dtype_from_name(config.model.dtype)
        )
        self.device = torch.device("cpu")
        self.trainer = Trainer(self.model, config.learner)
        self.source = make_source(config.task)
        self.admission = Admission(config.learner.prompts_per_step, config.learner.max_staleness)
        self.vocab_size = int(self.model.config.vocab_size)
        # Trainer state (checkpointed).
        self.step = 0
        self.version = 0
        self.next_data_index = 0
        self.issued_fresh = 0
        self.counters = {"prompts_issued": 0, "groups_trained": 0, "groups_dropped_stale": 0}
        self.trained_tasks: set[str] = set()
        self.history: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}  # run-level figures for the summary (checkpointed)
        self.resumed = resume
        if resume:
            self._restore()
        self.pending_acks: list[str] = []
        self.streams = RedisStreams(
            config.redis,
            config.run_id,
            consumer="learner",
            password=redis_password(config.redis),
            url=redis_url(config.redis),
            on_dead_letter=lambda reason: self.metrics.dlq_entries.labels(reason=reason).inc(),
        )
        self.registry = GeneratorRegistry(
            config.generator.heartbeat_ttl_s, expected_vocab_size=self.vocab_size
        )
        self.metrics.policy_version.set(self.version)
        self.metrics.max_staleness.set(config.learner.max_staleness)

    # -- checkpoint / resume ------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "next_data_index": self.next_data_index,
            "issued_fresh": self.issued_fresh,
            "counters": self.counters,
            "trained_tasks": sorted(self.trained_tasks),
            "history": self.history,
            "extra": self.extra,
        }

    def _restore(self) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            log.info("--resume: no checkpoint under %s; starting fresh", self.ckpt_dir)
            return
        state = load_checkpoint(path, self.model, self.trainer.optimizer, self.trainer.scheduler)
        self.step = state["step"]
        self.version = state["version"]
        self.next_data_index = state["next_data_index"]
        self.issued_fresh = state["issued_fresh"]
        self.counters = state["counters"]
        self.trained_tasks = set(state["trained_tasks"])
        self.history = state["history"]
        self.extra = state.get("extra", {})
        log.info("resumed from %s: step %d, version %d", path, self.step, self.version)

    def _checkpoint(self) -> None:
        t = time.monotonic()
        save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
            self._state(),
            self.config.learner.checkpoint.keep_last,
        )
        # Only now are the groups trained so far safe to forget.
        if self.pending_acks:
            self.streams.ack_groups(self.pending_acks)
            self.pending_acks = []
        elapsed = time.monotonic() - t
        self.metrics.checkpoint_seconds.observe(elapsed)
        self.metrics.step_phase_seconds.labels(phase="checkpoint").observe(elapsed)

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
            issue_version=self.version,
            issued_at=time.time(),
            temperature=s.temperature,
            max_new_tokens=s.max_new_tokens,
        )

    def _issue(self, reissue: list[int] | None = None) -> None:
        """Issue new prompts up to the admission limit, plus re-issues of dropped ones. The
        ledger in Redis moves in the same transaction, so a restarted learner neither loses
        nor repeats a data position."""
        reissue = reissue or []
        n = self.admission.num_to_issue(self.version, self.issued_fresh)
        indices = list(range(self.next_data_index, self.next_data_index + n))
        tasks = [self._task(i) for i in [*reissue, *indices]]
        if not tasks:
            return
        ledger = {
            "prompts_issued": len(tasks),
            "next_data_index": n,
            "issued_fresh": n,
            "groups_dropped_stale": len(reissue),
        }
        self.streams.issue_tasks(tasks, ledger=ledger)
        self.next_data_index += n
        self.issued_fresh += n
        self.counters["prompts_issued"] += len(tasks)
        self.counters["groups_dropped_stale"] += len(reissue)
        self.metrics.prompts_issued.inc(len(tasks))
        self.metrics.groups_dropped_stale.inc(len(reissue))

    def _adopt_ledger(self, resume: bool) -> None:
        """Take the issuer's position and counters from Redis, where they moved in step with the
        tasks actually issued (the checkpoint may be older)."""
        ledger = self.streams.ledger()
        if not ledger:
            return
        if not resume:
            raise RuntimeError(
                f"run {self.config.run_id!r} already has state in Redis ({self.streams.ledger_key}); "
                "continue it with `lpreg learner --resume`, or pick a new run_id"
            )
        self.next_data_index = ledger.get("next_data_index", 0)
        self.issued_fresh = ledger.get("issued_fresh", 0)
        self.counters["prompts_issued"] = ledger.get("prompts_issued", 0)
        self.counters["groups_dropped_stale"] = ledger.get("groups_dropped_stale", 0)
        log.info("issuer state from Redis: %s", ledger)

    # -- rollouts -----------------------------------------------------------------------------
    def _collect(self) -> list[rollout_pb2.RolloutGroup]:
        """Block until prompts_per_step fresh groups are in; drop and re-issue stale ones."""
        need = self.config.learner.prompts_per_step
        groups: list[rollout_pb2.RolloutGroup] = []
        seen: set[str] = set()
        while len(groups) < need and not self.stop.is_set():
            self._refresh_membership()
            deliveries = self.streams.read_groups(
                need - len(groups), self.config.redis.block_ms, vocab_size=self.vocab_size
            )
            reissue: list[int] = []
            dropped: list[str] = []
            for d in deliveries:
                g = d.value
                if g.task_id in self.trained_tasks or g.task_id in seen:
                    self.metrics.groups_duplicate.inc()
                    self.pending_acks.append(d.entry_id)
                    continue
                oldest, _ = group_policy_versions(g)
                if is_stale(self.version, oldest, self.config.learner.max_staleness):
                    reissue.append(g.data_index)
                    dropped.append(d.entry_id)
                    continue
                self.metrics.rollout_staleness.observe(staleness(self.version, oldest))
                seen.add(g.task_id)
                groups.append(g)
                self.pending_acks.append(d.entry_id)
            # Re-issue before acking the dropped groups: a crash in between re-drops, never loses.
            self._issue(reissue)
            if dropped:
                self.streams.ack_groups(dropped)
        return groups

    def _refresh_membership(self) -> None:
        """Bring generators that joined (or came back) up to the current version while waiting."""
        if self.publisher.needs_epoch() and self.registry.alive():
            self.publisher.publish(
                self.version, self.model, self.config.learner.publish_timeout_s, wait_loaded=False
            )

    # -- status -------------------------------------------------------------------------------
    def status(self) -> control_pb2.StatusResponse:
        reply = control_pb2.StatusResponse(
            run_id=self.config.run_id,
            policy_version=self.version,
            step=self.step,
            epoch=self.publisher.epoch if hasattr(self, "publisher") else 0,
            prompts_issued=self.counters["prompts_issued"],
            groups_trained=self.counters["groups_trained"],
            groups_dropped_stale=self.counters["groups_dropped_stale"],
            done=self.step >= self.config.learner.steps,
        )
        for g in self.registry.snapshot():
            reply.generators.append(
                control_pb2.GeneratorStatus(
                    generator_id=g.generator_id,
                    loaded_version=g.loaded_version,
                    alive=g.alive,
                    last_heartbeat_age_s=g.last_heartbeat_age_s,
                    member=g.member,
                    backend=g.backend,
                )
            )
        return reply

    def _observe_pipeline(self) -> None:
        try:
            for stream, n in self.streams.stream_lengths().items():
                self.metrics.stream_length.labels(stream=stream).set(n)
            for stream, n in self.streams.pending_counts().items():
                self.metrics.stream_pending.labels(stream=stream).set(n)
        except Exception as e:  # metrics must not stop training
            log.debug("stream metrics unavailable: %s", e)
        alive = self.registry.alive()
        self.metrics.generators.labels(state="alive").set(len(alive))
        self.metrics.generators.labels(state="member").set(len(self.publisher.members))
        for gid, v in self.registry.loaded_versions().items():
            self.metrics.generator_weight_version.labels(generator=gid).set(v)

    def _wait_for_generators(self) -> None:
        want = self.config.learner.min_generators
        deadline = time.monotonic() + self.config.learner.min_generators_timeout_s
        while len(self.registry.alive()) < want and not self.stop.is_set():
            if time.monotonic() > deadline:
                log.warning(
                    "%d of %d generators registered after %.0fs; starting anyway",
                    len(self.registry.alive()),
                    want,
                    self.config.learner.min_generators_timeout_s,
                )
                return
            self.stop.wait(0.2)
        log.info("%d generator(s) registered", len(self.registry.alive()))

    # -- main loop ----------------------------------------------------------------------------
    def _train_step(
        self, groups: list[rollout_pb2.RolloutGroup], waited_s: float
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        batch = build_batch(groups, self.config.learner.advantage_mode)
        stats = self.trainer.step(batch)
        train_s = time.monotonic() - t0
        self.step += 1
        self.version += 1
        self.metrics.policy_version.set(self.version)
        self.streams.set_version(self.version)
        for g in groups:
            self.trained_tasks.add(g.task_id)
        self.counters["groups_trained"] += len(groups)
        t1 = time.monotonic()
        result = self.publisher.publish(
            self.version,
            self.model,
            self.config.learner.publish_timeout_s,
            wait_loaded=self.config.learner.max_staleness == 0,
        )
        publish_s = time.monotonic() - t1
        oldest = [group_policy_versions(g)[0] for g in groups]
        record: dict[str, Any] = {
            "step": self.step,
            "version": self.version,
            **{k: float(f"{v:.6g}") for k, v in stats.items()},
            "staleness_mean": sum(self.version - 1 - v for v in oldest) / len(oldest),
            "groups_dropped_stale": self.counters["groups_dropped_stale"],
            "wait_s": round(waited_s, 4),
            "train_s": round(train_s, 4),
            "publish_s": round(publish_s, 4),
            "publish_ok": result.ok,
            "members": len(result.members),
            "tokens_per_s": round(
                stats["num_tokens"] / max(1e-9, waited_s + train_s + publish_s), 2
            ),
            "time": time.time(),
        }
        m = self.metrics
        m.steps.inc()
        m.step_seconds.observe(waited_s + train_s + publish_s)
        m.step_phase_seconds.labels(phase="wait_rollouts").observe(waited_s)
        m.step_phase_seconds.labels(phase="forward_backward").observe(train_s)
        m.step_phase_seconds.labels(phase="publish").observe(publish_s)
        m.regularized_tokens.inc(stats.get("num_regularized", 0.0))
        m.candidate_tokens.inc(stats.get("num_candidates", 0.0))
        m.lpreg_kl.set(stats.get("loss_kl", 0.0))
        m.entropy.set(stats["entropy"])
        m.reward_mean.set(stats["reward_mean"])
        m.loss.set(stats["loss"])
        m.pg_clipfrac.set(stats.get("pg_clipfrac", 0.0))
        m.ppo_kl.set(stats.get("ppo_kl", 0.0))
        m.grad_norm.set(stats["grad_norm"])
        m.learning_rate.set(stats["lr"])
        m.groups_trained.inc(len(groups))
        m.tokens_trained.inc(stats["num_tokens"])
        return record

    def _log_record(self, record: dict[str, Any]) -> None:
        every = self.config.learner.eval_every_steps
        if every and (self.step % every == 0 or self.step == self.config.learner.steps):
            record["eval_accuracy"] = greedy_accuracy(
                self.model, self.config, self.source.eval_problems(self.config.learner.eval_prompts)
            )
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _finish(self, wall_s: float) -> dict[str, Any]:
        if self.pending_acks:
            self._checkpoint()
        wait = self.config.learner.final_publish_wait_s
        if self.publisher.last_published != self.version or self.publisher.needs_epoch():
            self.publisher.publish(
                self.version, self.model, self.config.learner.publish_timeout_s, False
            )
        members = [g.generator_id for g in self.registry.alive()]
        self.registry.wait_loaded(self.version, members, wait)
        self.model.save_pretrained(self.run_dir / "final_model")
        summary = self.summary(wall_s)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def summary(self, wall_s: float) -> dict[str, Any]:
        first = self.history[0] if self.history else {}
        last = self.history[-1] if self.history else {}
        tail = self.history[-max(1, len(self.history) // 5) :]
        head = self.history[: max(1, len(self.history) // 5)]

        def mean(rows: list[dict[str, Any]], key: str) -> float | None:
            vals = [r[key] for r in rows if key in r]
            return round(sum(vals) / len(vals), 4) if vals else None

        evals = [r["eval_accuracy"] for r in self.history if "eval_accuracy" in r]
        dlq = self.streams.dlq_length()
        backlog = self.streams.backlog()
        outstanding = sum(backlog.values())
        return {
            "run_id": self.config.run_id,
            "steps": self.step,
            "policy_version": self.version,
            "prompts_issued": self.counters["prompts_issued"],
            "groups_trained": self.counters["groups_trained"],
            "groups_dropped_stale": self.counters["groups_dropped_stale"],
            "rollouts_in_dlq": dlq,
            "prompts_trained": len(self.trained_tasks),
            "prompts_outstanding": outstanding,
            "backlog": {**backlog, "pending": self.streams.pending_counts()},
            "prompts_unaccounted": self.counters["prompts_issued"]
            - len(self.trained_tasks)
            - self.counters["groups_dropped_stale"]
            - dlq
            - outstanding,
            "generator_weight_versions": dict(sorted(self.registry.loaded_versions().items())),
            "reward_mean_first": first.get("reward_mean"),
            "reward_mean_last": last.get("reward_mean"),
            "reward_mean_first_fifth": mean(head, "reward_mean"),
            "reward_mean_last_fifth": mean(tail, "reward_mean"),
            "entropy_first": first.get("entropy"),
            "entropy_last": last.get("entropy"),
            "eval_accuracy_start": self.extra.get("eval_accuracy_start"),
            "eval_accuracy_first": evals[0] if evals else None,
            "eval_accuracy_last": evals[-1] if evals else None,
            "num_regularized_total": sum(r.get("num_regularized", 0) for r in self.history),
            "wall_s": round(wall_s, 2),
        }

    def run(self) -> dict[str, Any]:
        config = self.config
        log.info("resolved config:\n%s", dump_config(config))
        self.streams.connect()
        self.streams.ensure_groups()
        self._adopt_ledger(self.resumed)
        published = self.streams.get_version()
        if self.resumed and published is not None and published >= self.version:
            # Versions past the checkpoint were published by the lost process: the restored
            # weights get a fresh number, so the version sequence never repeats or goes back.
            log.info(
                "restored weights become v%d (v%d was published before)", published + 1, published
            )
            self.version = published + 1
        self.streams.set_version(self.version)
        self.metrics.policy_version.set(self.version)
        sender = WeightSender(config.broadcast, self.device)
        backend = sender.backend
        advertise = config.broadcast.advertise_host or config.broadcast.store_host
        self.publisher = WeightPublisher(
            self.registry, sender, config.broadcast, backend, advertise, self.metrics
        )
        servicer = LearnerControlServicer(
            self.registry,
            self.status,
            config.run_id,
            lambda: self.version,
            config.generator.heartbeat_interval_s,
        )
        server, grpc_port = build_server(config.control, servicer, load_auth_token(config.control))
        metrics_port = serve_metrics(
            self.registry_prom, config.metrics.host, config.metrics.learner_port
        )
        log.info(
            "learner up: gRPC :%d, metrics :%d, store :%d, run dir %s",
            grpc_port,
            metrics_port,
            sender.port,
            self.run_dir,
        )
        start = time.monotonic()
        if (
            config.learner.eval_every_steps
            and self.step == 0
            and "eval_accuracy_start" not in self.extra
        ):
            self.extra["eval_accuracy_start"] = greedy_accuracy(
                self.model, config, self.source.eval_problems(config.learner.eval_prompts)
            )
            log.info(
                "greedy eval accuracy before training: %.3f", self.extra["eval_accuracy_start"]
            )
        try:
            self._wait_for_generators()
            self._issue()
            while self.step < config.learner.steps and not self.stop.is_set():
                t = time.monotonic()
                groups = self._collect()
                if self.stop.is_set():
                    break
                record = self._train_step(groups, time.monotonic() - t)
                self._log_record(record)
                self._observe_pipeline()
                if (
                    self.step % config.learner.checkpoint.every_steps == 0
                    or self.step >= config.learner.steps
                ):
                    self._checkpoint()
                self._issue()
                log.info(
                    "step %d v%d reward %.3f entropy %.3f reg %d",
                    self.step,
                    self.version,
                    record["reward_mean"],
                    record["entropy"],
                    int(record.get("num_regularized", 0)),
                )
            summary = self._finish(time.monotonic() - start)
            if not config.learner.exit_when_done and not self.stop.is_set():
                # Generators stay registered and idle (no more tasks), instead of exiting into a
                # restart loop under a Deployment.
                log.info("run complete; staying up until stopped (learner.exit_when_done=false)")
                self.stop.wait()
            self.registry.close("run complete")
        finally:
            self.registry.close("learner stopping")
            server.stop(grace=2.0)
            self.publisher.close()
            self.streams.close()
        return summary


def run_learner(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    learner = Learner(config, resume=resume)

    def _graceful(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current step", signum)
        learner.stop.set()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    return learner.run()

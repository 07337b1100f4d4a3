"""Prometheus metrics of the learner (names follow lpreg_<component>_<what>_<unit>)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import STEP_BUCKETS_S, SharedMetrics

STEP_PHASES = ("wait_rollouts", "stats", "forward_backward", "optimizer", "publish", "checkpoint")
STREAMS = ("prompts", "rollouts", "dlq")
# Streams read through a consumer group (prompts: `generators`, rollouts: `learner`); their
# undelivered backlog is XINFO GROUPS `lag`.
GROUP_STREAMS = ("prompts", "rollouts")
# Why a weight publish failed: the epoch could not be formed (join), the collective send failed
# (broadcast), or members did not report the version loaded before the deadline (ack).
BROADCAST_FAILURES = ("join", "broadcast", "ack")
# How often the service loop refreshes the timer-driven gauges (stream backlog); the HPA and the
# dashboards read them between steps, which can last many minutes on large models.
BACKLOG_REFRESH_S = 5.0


class RolloutWaitClock(Collector):
    """lpreg_learner_wait_rollouts_seconds_total: seconds spent waiting for rollouts, counted up to
    the moment of the scrape (a wait in progress included), so the rate is the learner's
    wait-for-rollouts share even while one long wait lasts."""

    NAME = "lpreg_learner_wait_rollouts_seconds"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._done_s = 0.0
        self._since: float | None = None

    def start(self) -> None:
        with self._lock:
            if self._since is None:
                self._since = self._clock()

    def stop(self) -> None:
        with self._lock:
            if self._since is not None:
                self._done_s += max(0.0, self._clock() - self._since)
                self._since = None

    def total_s(self) -> float:
        with self._lock:
            running = 0.0 if self._since is None else max(0.0, self._clock() - self._since)
            return self._done_s + running

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            self.NAME,
            "Seconds the learner waited for rollouts (a wait in progress counts up to the scrape); "
            "its rate is the wait-for-rollouts share the generator autoscaler reads.",
        )
        family.add_metric([], self.total_s())
        yield family


class LearnerMetrics(SharedMetrics):
    def __init__(self, registry: CollectorRegistry, run_id: str) -> None:
        super().__init__(registry, "learner", run_id)
        r = registry
        self.step_seconds = Histogram(
            "lpreg_learner_step_seconds",
            "Wall time of one optimiser step.",
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.step_phase_seconds = Histogram(
            "lpreg_learner_step_phase_seconds",
            "Wall time of each phase of a step.",
            ["phase"],
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        for phase in STEP_PHASES:
            self.step_phase_seconds.labels(phase=phase)
        self.steps = Counter("lpreg_learner_steps", "Optimiser steps completed.", registry=r)
        self.policy_version = Gauge(
            "lpreg_learner_policy_version", "Current policy version.", registry=r
        )
        self.rollout_staleness = Histogram(
            "lpreg_learner_rollout_staleness",
            "Policy versions between sampling and training, per trained group (oldest token).",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.regularized_tokens = Counter(
            "lpreg_learner_lpreg_regularized_tokens",
            "Tokens in the Lp-Reg regularised set.",
            registry=r,
        )
        self.candidate_tokens = Counter(
            "lpreg_learner_lpreg_candidate_tokens", "Lp-Reg candidate tokens.", registry=r
        )
        self.lpreg_kl = Gauge(
            "lpreg_learner_lpreg_kl",
            "Lp-Reg KL term of the last step (beta * k3, token-mean).",
            registry=r,
        )
        self.entropy = Gauge(
            "lpreg_learner_entropy",
            "Token-mean policy entropy of the last step (nats).",
            registry=r,
        )
        self.reward_mean = Gauge(
            "lpreg_learner_reward_mean", "Mean reward of the last step's rollouts.", registry=r
        )
        self.loss = Gauge("lpreg_learner_loss", "Policy loss of the last step.", registry=r)
        self.pg_clipfrac = Gauge(
            "lpreg_learner_pg_clipfrac", "Fraction of tokens clipped by PPO.", registry=r
        )
        self.ppo_kl = Gauge(
            "lpreg_learner_ppo_kl", "k3 KL between current and old policy.", registry=r
        )
        self.grad_norm = Gauge(
            "lpreg_learner_grad_norm", "Global gradient norm before clipping.", registry=r
        )
        self.learning_rate = Gauge(
            "lpreg_learner_learning_rate", "Current learning rate.", registry=r
        )
        self.prompts_issued = Counter(
            "lpreg_learner_prompts_issued", "Prompt tasks issued.", registry=r
        )
        self.groups_trained = Counter(
            "lpreg_learner_groups_trained", "Rollout groups trained on.", registry=r
        )
        self.groups_dropped_stale = Counter(
            "lpreg_learner_groups_dropped_stale", "Rollout groups dropped as too stale.", registry=r
        )
        self.groups_duplicate = Counter(
            "lpreg_learner_groups_duplicate",
            "Rollout groups ignored as already trained (redelivery).",
            registry=r,
        )
        self.tokens_trained = Counter(
            "lpreg_learner_tokens_trained", "Completion tokens trained on.", registry=r
        )
        self.tokens_wasted = Counter(
            "lpreg_learner_tokens_wasted",
            "Completion tokens generated but never trained (their groups arrived stale).",
            registry=r,
        )
        self.stream_length = Gauge(
            "lpreg_redis_stream_length",
            "Entries in each Redis stream of the run.",
            ["stream"],
            registry=r,
        )
        self.stream_pending = Gauge(
            "lpreg_redis_stream_pending",
            "Delivered but unacknowledged entries per stream.",
            ["stream"],
            registry=r,
        )
        for s in STREAMS:
            self.stream_length.labels(stream=s)
        for s in STREAMS[:2]:
            self.stream_pending.labels(stream=s)
        self.generators = Gauge(
            "lpreg_learner_generators",
            "Registered generators by state (alive, member).",
            ["state"],
            registry=r,
        )
        self.generator_weight_version = Gauge(
            "lpreg_learner_generator_weight_version",
            "Policy version each generator last reported loaded.",
            ["generator"],
            registry=r,
        )
        self.max_staleness = Gauge(
            "lpreg_learner_max_staleness", "Configured max_staleness (policy versions).", registry=r
        )
        self.group_epoch = Gauge("lpreg_learner_group_epoch", "Broadcast group epoch.", registry=r)
        self.checkpoint_seconds = Histogram(
            "lpreg_learner_checkpoint_seconds",
            "Time to write a checkpoint.",
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.stream_undelivered = Gauge(
            "lpreg_redis_stream_undelivered",
            "Entries no consumer of the stream's group has read yet (XINFO GROUPS lag): for "
            "prompts, the backlog waiting for a generator. Refreshed every BACKLOG_REFRESH_S.",
            ["stream"],
            registry=r,
        )
        self.wait_clock = RolloutWaitClock()
        r.register(self.wait_clock)
        self.run_complete = Gauge(
            "lpreg_learner_run_complete",
            "1 once the run has trained all its steps and written its final model, else 0.",
            registry=r,
        )
        self.eval_accuracy = Gauge(
            "lpreg_learner_eval_accuracy",
            "Greedy accuracy on held-out prompts at the last evaluation (NaN before the first).",
            registry=r,
        )
        self.eval_accuracy.set(math.nan)
        self.zero_advantage_groups = Counter(
            "lpreg_learner_zero_advantage_groups",
            "Trained groups whose rewards were all equal (zero advantage: no learning signal).",
            registry=r,
        )
        self.broadcast_failures = Counter(
            "lpreg_learner_broadcast_failures",
            "Weight publishes that failed, by phase (join, broadcast, ack).",
            ["reason"],
            registry=r,
        )
        for reason in BROADCAST_FAILURES:
            self.broadcast_failures.labels(reason=reason)
        self.broadcast_bytes = Counter(
            "lpreg_learner_broadcast_bytes",
            "Weight bytes sent by the collective broadcast (divide its rate by the broadcast "
            "phase's seconds for the bandwidth).",
            registry=r,
        )
        self.last_checkpoint_timestamp = Gauge(
            "lpreg_learner_last_checkpoint_timestamp_seconds",
            "Unix time of the newest durable checkpoint (NaN before the first).",
            registry=r,
        )
        self.last_checkpoint_timestamp.set(math.nan)

    @contextmanager
    def waiting_for_rollouts(self) -> Iterator[None]:
        """Wrap every wait for rollout groups: the wait counts while it lasts, not at its end."""
        self.wait_clock.start()
        try:
            yield
        finally:
            self.wait_clock.stop()

    def set_backlog(self, undelivered: dict[str, int | None]) -> None:
        """Undelivered entries per stream from XINFO GROUPS lag; None (Redis cannot tell, e.g.
        after a trim of unread entries) leaves the last value."""
        for stream, n in undelivered.items():
            if n is not None:
                self.stream_undelivered.labels(stream=stream).set(n)

    def forget_generator(self, generator_id: str) -> None:
        """Drop a departed generator's series, so no alert or panel keeps a dead pod's last value."""
        with suppress(KeyError):  # it never reported a loaded version
            self.generator_weight_version.remove(generator_id)

    def set_run_complete(self) -> None:
        """The run trained all its steps: stall and availability alerts stand down."""
        self.run_complete.set(1)

    def checkpoint_written(self, wall_time_s: float | None = None) -> None:
        self.last_checkpoint_timestamp.set(time.time() if wall_time_s is None else wall_time_s)

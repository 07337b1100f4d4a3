"""Prometheus metrics of the learner (names follow lpreg_<component>_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import STEP_BUCKETS_S, SharedMetrics

STEP_PHASES = ("wait_rollouts", "stats", "forward_backward", "optimizer", "publish", "checkpoint")
STREAMS = ("prompts", "rollouts", "dlq")


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

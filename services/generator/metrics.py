"""Prometheus metrics of a generator."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import STEP_BUCKETS_S, SharedMetrics


class GeneratorMetrics(SharedMetrics):
    def __init__(self, registry: CollectorRegistry, run_id: str) -> None:
        super().__init__(registry, "generator", run_id)
        r = registry
        self.tokens = Counter("lpreg_generator_tokens", "Completion tokens sampled.", registry=r)
        self.groups = Counter("lpreg_generator_groups", "Rollout groups published.", registry=r)
        self.tasks_reclaimed = Counter(
            "lpreg_generator_tasks_reclaimed",
            "Prompt tasks reclaimed from dead generators.",
            registry=r,
        )
        self.weight_version = Gauge(
            "lpreg_generator_weight_version", "Policy version of the loaded weights.", registry=r
        )
        self.tasks_in_flight = Gauge(
            "lpreg_generator_tasks_in_flight", "Prompt tasks being sampled.", registry=r
        )
        self.generate_seconds = Histogram(
            "lpreg_generator_generate_seconds",
            "Time to sample one rollout group.",
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.reward_mean = Gauge(
            "lpreg_generator_reward_mean", "Mean reward of the last published group.", registry=r
        )

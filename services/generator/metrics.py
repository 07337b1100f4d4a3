"""Prometheus metrics of a generator."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.metrics import STEP_BUCKETS_S, SharedMetrics

# Completion lengths from a few tokens (tiny task) to long reasoning traces (32k).
RESPONSE_LENGTH_BUCKETS = (4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# Labels of lpreg_generator_responses_total, from rollout.proto's FinishReason.
FINISH_REASONS = ("stop", "length")
# vLLM's engine statistics (KV-cache use, running/waiting requests, preemptions) live in
# prometheus_client's global registry under this prefix when the engine runs with log stats on.
VLLM_PREFIX = "vllm:"


class VllmEngineMetrics(Collector):
    """Re-exports vLLM's own engine metrics through the generator's /metrics endpoint, so they
    carry the same run, namespace and pod labels as every lpreg series."""

    def __init__(self, source: CollectorRegistry = REGISTRY) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name.startswith(VLLM_PREFIX):
                yield family


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
        self.response_length = Histogram(
            "lpreg_generator_response_length_tokens",
            "Tokens of each sampled completion.",
            buckets=RESPONSE_LENGTH_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "lpreg_generator_responses",
            "Sampled completions by finish reason (length: cut off at max_new_tokens).",
            ["finish_reason"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.responses.labels(finish_reason=reason)
        if registry is not REGISTRY:
            r.register(VllmEngineMetrics())

    def observe_response(self, num_tokens: int, truncated: bool) -> None:
        """One sampled completion: its length and whether max_new_tokens cut it off."""
        self.response_length.observe(num_tokens)
        self.responses.labels(finish_reason="length" if truncated else "stop").inc()

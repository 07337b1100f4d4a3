"""Metric helpers shared by every service: registry, exposition server, shared metric families."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server

from lpreg_core.rollout import DLQ_REASONS

# Weight sync durations range from milliseconds (tiny model, loopback) to minutes (70B over NCCL).
SYNC_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class SharedMetrics:
    """Families both the learner and the generators export (distinguished by scrape target)."""

    def __init__(self, registry: CollectorRegistry, component: str, run_id: str) -> None:
        self.build_info = Info(
            "lpreg_build", "Service identity: component and run.", registry=registry
        )
        self.build_info.info({"component": component, "run_id": run_id, "version": "0.1.0"})
        self.dlq_entries = Counter(
            "lpreg_dlq_entries",
            "Stream entries moved to the dead-letter stream, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in DLQ_REASONS:
            self.dlq_entries.labels(reason=reason)
        self.weight_sync_seconds = Histogram(
            "lpreg_weight_sync_seconds",
            "Duration of weight-sync phases (learner: join, manifest, broadcast, acks, total; "
            "generator: join, receive_apply).",
            ["phase"],
            buckets=SYNC_BUCKETS_S,
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_address[1])

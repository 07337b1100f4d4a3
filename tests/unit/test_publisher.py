"""The learner's publisher survives its members: a dead member, a deadline or a member's bad
bytes cost an epoch, never the learner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_learner_loop import connect

from lpreg_core.config import BroadcastConfig
from lpreg_core.weights import WeightManifest
from services.learner.metrics import LearnerMetrics
from services.learner.publisher import BroadcastPublisher
from services.learner.registry import GeneratorRegistry
from services.weight_sync import BroadcastFailed, ChecksumMismatch


class FailingSender:
    backend = "gloo"
    port = 1

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.epochs: list[int] = []
        self.sends = 0

    def epoch_secret(self, epoch: int) -> bytes:
        return bytes([epoch]) * 32

    def open_epoch(self, epoch: int, world_size: int, join_timeout_s: float) -> None:
        self.epochs.append(epoch)

    def send(self, flats: Sequence[torch.Tensor], timeout_s: float) -> None:
        raise AssertionError("the publisher sends lazily (send_weights)")

    def send_weights(
        self,
        manifest: WeightManifest,
        weights: Iterable[tuple[str, torch.Tensor]],
        timeout_s: float,
    ) -> None:
        self.sends += 1
        if self.sends == 1:
            raise self.error
        for _ in weights:
            pass

    def close_epoch(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [ChecksumMismatch("gen-0 received other bytes"), BroadcastFailed("deadline passed")],
)
def test_a_failed_broadcast_drops_the_epoch_not_the_learner(error: Exception) -> None:
    registry = GeneratorRegistry(30.0)
    _, gone = connect(registry, "gen-0")
    sender = FailingSender(error)
    weights = [("w", torch.ones(4))]
    publisher = BroadcastPublisher(
        registry,
        sender,
        lambda: iter(weights),
        BroadcastConfig(),
        "127.0.0.1",
        LearnerMetrics(CollectorRegistry(), "t"),
    )
    result = publisher.publish(1, timeout_s=1.0, wait_loaded=False)
    assert sender.epochs == [1]
    assert not result.ok
    assert publisher.needs_epoch()  # the next publish rebuilds the group
    assert publisher.metrics.broadcast_failures.labels(reason="broadcast")._value.get() == 1
    assert publisher.publish(2, timeout_s=1.0, wait_loaded=False).ok
    assert sender.epochs == [1, 2]
    gone.set()

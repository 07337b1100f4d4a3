"""The interfaces of weight sync: what the learner loop publishes through, and the bucket
transport underneath.

``WeightPublisher`` is all the learner loop sees: publish version v to the current members (opening
a new group epoch first when membership changed), report who took part. Underneath, a
``BucketSender`` (learner) and one ``BucketReceiver`` per generator worker move the flat buckets
planned by ``lpreg_core.weights.build_manifest``; the manifest itself travels on the control
plane. ``services.weight_sync`` implements them with a collective broadcast (Gloo on CPU, NCCL on
GPU); another transport (CUDA IPC on one host, a shared filesystem path) fits behind the same
interfaces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from lpreg_core.weights import WeightManifest


@dataclass
class PublishResult:
    """The outcome of one publish: who was sent ``version`` and who confirmed loading it."""

    version: int
    members: list[str]
    loaded: dict[str, int] = field(default_factory=dict)
    ok: bool = True


class WeightPublisher(Protocol):
    """Learner side, as the learner loop uses it."""

    @property
    def members(self) -> list[str]:
        """Generator ids of the current group epoch."""
        ...

    @property
    def epoch(self) -> int: ...

    @property
    def last_published(self) -> int:
        """The last version sent successfully (-1 before the first)."""
        ...

    def needs_epoch(self) -> bool:
        """True when membership changed (or the last broadcast failed) since the epoch opened."""
        ...

    def publish(self, version: int, timeout_s: float, wait_loaded: bool) -> PublishResult:
        """Send the learner's current weights as ``version``; with ``wait_loaded``, also wait
        (bounded) until every member reports it loaded. Never raises for a dead member: it is
        dropped and the result says so."""
        ...

    def close(self) -> None: ...


class BucketSender(Protocol):
    """Learner side of the bucket transport (rank 0)."""

    @property
    def backend(self) -> str:
        """The collective backend members must use ("gloo", "nccl")."""
        ...

    @property
    def port(self) -> int:
        """Where members rendezvous."""
        ...

    def epoch_secret(self, epoch: int) -> bytes:
        """The rendezvous secret of ``epoch``, drawn fresh for it; members learn it only from the
        (authenticated) control plane, and nobody without it can claim a rank."""
        ...

    def open_epoch(self, epoch: int, world_size: int, join_timeout_s: float) -> None:
        """Form the group of ``world_size`` ranks, waiting at most ``join_timeout_s`` for them."""
        ...

    def send(self, flats: Sequence[Tensor], timeout_s: float) -> None:
        """Send every bucket and wait until every member has checked what it received."""
        ...

    def close_epoch(self) -> None: ...

    def close(self) -> None: ...


class BucketReceiver(Protocol):
    """Generator side of the bucket transport, one per worker."""

    def join(
        self,
        epoch: int,
        rank: int,
        world_size: int,
        store_host: str,
        store_port: int,
        backend: str,
        timeout_s: float,
        *,
        secret: bytes,
    ) -> None: ...

    def receive_buckets(
        self, manifest: WeightManifest, device: str, timeout_s: float
    ) -> AbstractContextManager[Iterator[tuple[str, Tensor]]]:
        """The published tensors, by name, one bucket at a time (at most two buckets alive):
        load each as it arrives. Closing the stream early drains the rest of the publish."""
        ...

    def leave(self) -> None: ...

    def close(self) -> None: ...

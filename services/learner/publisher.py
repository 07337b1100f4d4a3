"""Publishing weights to the generators: group epochs, manifest over gRPC, bucketed broadcast.

Membership changes only between publishes. When the set of live generators differs from the
members of the current epoch (a join, a death, a re-registration) or the last broadcast failed,
the next publish starts a new epoch: every live generator is told its rank range over the
control stream, the learner waits (bounded) for them to announce themselves in the TCPStore, and
a fresh process group is built. Generators that miss the join deadline are left out and the epoch
is rebuilt without them; a broadcast that fails or passes its deadline closes the epoch. The
learner never waits on a dead peer for longer than one deadline.

A publish never copies the whole model: the manifest is planned from the weights' names, shapes
and dtypes (learned once, tensor by tensor, unless given), and each bucket is filled from the
weights iterator only while the previous one is on the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from lpreg_core.config import BroadcastConfig
from lpreg_core.weight_sync import BucketSender, Layout, PublishResult, layout_of, plan_manifest
from lpreg_core.weights import manifest_to_proto
from lpreg_core.wire.lpreg.v1 import control_pb2
from services.learner.metrics import LearnerMetrics
from services.learner.registry import GeneratorRegistry
from services.weight_sync import (
    BroadcastError,
    BroadcastFailed,
    MembersMissing,
)

log = logging.getLogger("lpreg.learner.publish")

# Rebuilding an epoch without the generators that missed the deadline converges in a few rounds;
# past this the publish is skipped and retried at the next step.
MAX_EPOCH_ATTEMPTS = 3


NamedTensors = Callable[[], Iterable[tuple[str, torch.Tensor]]]


class BroadcastPublisher:
    """``lpreg_core.weight_sync.WeightPublisher`` over a collective ``BucketSender``.

    ``weights`` returns the learner's current (name, tensor) pairs each time it is called, in
    the same order every time; they are drawn one at a time while the buckets go out. ``layout``
    gives their (name, shape, dtype) without producing data; without it the first publish
    learns the layout by one extra pass over ``weights`` (keeping no tensor), and a publish
    whose weights no longer match it fails and learns it again.
    """

    def __init__(
        self,
        registry: GeneratorRegistry,
        sender: BucketSender,
        weights: NamedTensors,
        config: BroadcastConfig,
        advertise_host: str,
        metrics: LearnerMetrics,
        layout: Callable[[], Layout] | None = None,
    ) -> None:
        self.registry = registry
        self.sender = sender
        self.weights = weights
        self.config = config
        self.backend = sender.backend
        self.advertise_host = advertise_host
        self.metrics = metrics
        self.epoch = 0
        self._members: dict[str, int] = {}  # generator id -> rank offset
        self._epoch_ok = False
        self.last_published = -1
        self._layout_source = layout
        self._layout: list[tuple[str, torch.Size, torch.dtype]] | None = None

    @property
    def members(self) -> list[str]:
        return sorted(self._members)

    def needs_epoch(self) -> bool:
        alive = {g.generator_id for g in self.registry.alive()}
        # A re-registered generator keeps its id but lost its group: the registry unmarks it.
        members = {g.generator_id for g in self.registry.members()}
        return not self._epoch_ok or alive != set(self._members) or members != set(self._members)

    def _open_epoch(self, timeout_s: float) -> bool:
        if self._epoch_ok:
            self.sender.close_epoch()
            self._epoch_ok = False
        candidates = {g.generator_id: g for g in self.registry.alive()}
        for _ in range(MAX_EPOCH_ATTEMPTS):
            if not candidates:
                self._members = {}
                return False
            self.epoch += 1
            offsets: dict[str, int] = {}
            rank = 1
            for gid in sorted(candidates):
                offsets[gid] = rank
                rank += max(1, candidates[gid].num_workers)
            for gid, offset in offsets.items():
                self.registry.send(
                    gid,
                    control_pb2.ControlEvent(
                        join=control_pb2.JoinGroup(
                            epoch=self.epoch,
                            rank_offset=offset,
                            world_size=rank,
                            store_host=self.advertise_host,
                            store_port=self.sender.port,
                            backend=self.backend,
                            timeout_s=timeout_s,
                            secret=self.sender.epoch_secret(self.epoch),
                        )
                    ),
                )
            try:
                self.sender.open_epoch(self.epoch, rank, self.config.join_timeout_s)
            except MembersMissing as e:
                missing = set(e.missing_ranks)
                dropped = [
                    gid
                    for gid, off in offsets.items()
                    if missing & set(range(off, off + max(1, candidates[gid].num_workers)))
                ]
                log.warning(
                    "epoch %d: %s missed the join deadline; rebuilding", self.epoch, dropped
                )
                for gid in dropped:
                    candidates.pop(gid, None)
                continue
            except BroadcastFailed as e:
                log.warning("epoch %d could not be formed: %s", self.epoch, e)
                continue
            self._members = offsets
            self._epoch_ok = True
            self.registry.mark_members(list(offsets), self.epoch)
            self.metrics.group_epoch.set(self.epoch)
            log.info("epoch %d: world size %d, members %s", self.epoch, rank, sorted(offsets))
            return True
        self._members = {}
        return False

    def publish(self, version: int, timeout_s: float, wait_loaded: bool) -> PublishResult:
        start = time.monotonic()
        sync = self.metrics.weight_sync_seconds
        if self.needs_epoch():
            t = time.monotonic()
            opened = self._open_epoch(timeout_s)
            sync.labels(phase="join").observe(time.monotonic() - t)
            if not opened:
                self.metrics.broadcast_failures.labels(reason="join").inc()
                return PublishResult(version, [], {}, False)
        t = time.monotonic()
        if self._layout is None:
            with torch.no_grad():
                self._layout = (
                    [(n, torch.Size(s), d) for n, s, d in self._layout_source()]
                    if self._layout_source is not None
                    else layout_of(self.weights())
                )
        manifest = plan_manifest(version, self._layout, self.config.bucket_bytes)
        event = control_pb2.ControlEvent(
            publish=control_pb2.PublishWeights(
                version=version, epoch=self.epoch, manifest=manifest_to_proto(manifest)
            )
        )
        members = self.members
        self.registry.send_all(event, members)
        sync.labels(phase="manifest").observe(time.monotonic() - t)
        t = time.monotonic()
        weights = iter(self.weights())
        try:
            with torch.no_grad():
                self.sender.send_weights(manifest, ((n, p.detach()) for n, p in weights), timeout_s)
        except (BroadcastError, ValueError) as e:
            # A dead member, a deadline, a member's bad bytes; or weights that no longer match
            # the layout (learned again for the next publish).
            log.warning(
                "broadcast of v%d failed (%s); the next publish starts a new epoch", version, e
            )
            if isinstance(e, ValueError):
                self._layout = None
            self.sender.close_epoch()
            self._epoch_ok = False
            self.metrics.broadcast_failures.labels(reason="broadcast").inc()
            return PublishResult(version, members, {}, False)
        finally:
            # A publish that stopped early lets the weights finish (a sharded learner's other
            # ranks are in its gathers).
            close = getattr(weights, "close", None)
            if close is not None:
                close()
        sync.labels(phase="broadcast").observe(time.monotonic() - t)
        self.metrics.broadcast_bytes.inc(manifest.total_bytes)
        loaded: dict[str, int] = {}
        if wait_loaded:
            t = time.monotonic()
            reports = self.registry.wait_loaded(version, members, timeout_s)
            loaded = {gid: r.version for gid, r in reports.items()}
            if len(loaded) < len(members):
                self.metrics.broadcast_failures.labels(reason="ack").inc()
            sync.labels(phase="acks").observe(time.monotonic() - t)
        sync.labels(phase="total").observe(time.monotonic() - start)
        self.last_published = version
        return PublishResult(version, members, loaded, True)

    def close(self) -> None:
        if self._epoch_ok:
            self.sender.close_epoch()
        self.sender.close()

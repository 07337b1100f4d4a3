"""Learner side of the weight broadcast (rank 0): the TCPStore, epochs, bucketed sends."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Work

from lpreg_core.weight_sync import fill_buckets
from lpreg_core.weights import BucketSpec, WeightManifest, checksum_of_buckets, dtype_from_name
from services.weight_sync.group import (
    _ABORTED_KEY,
    _MEMBERS_KEY,
    _STORE_CLIENT_TIMEOUT_S,
    JOIN_POLL_INTERVAL_S,
    BroadcastFailed,
    ChecksumMismatch,
    GroupBackend,
    MembersMissing,
    _claim_macs,
    _claim_member,
    _Deadline,
    _epoch_start,
    _Group,
    _is_wildcard,
    _joined_key,
    _new_backend,
    resolve_backend,
)
from services.weight_sync.integrity import feed, wire_chunks
from services.weight_sync.rendezvous import (
    BucketMac,
    EpochKeys,
    SealedStore,
    choose_mac,
    new_secret,
)

if TYPE_CHECKING:
    from lpreg_core.config import BroadcastConfig

log = logging.getLogger(__name__)

# An epoch's own keys number a few per rank; far more keys outside the kept epochs means someone
# writes into the store. Deleting is one store round trip per key, so the sweep is capped to keep
# opening an epoch fast whatever was written.
_SWEEP_MAX_KEYS = 10_000
# Buckets the learner has on the wire at once: one being sent while the next is packed.
MAX_BUCKETS_IN_FLIGHT = 2


class WeightSender:
    """Learner side (rank 0): owns the TCPStore and the group of the current epoch.

    ``WeightSender(config.broadcast, device)`` binds the store on ``store_host:store_port``
    (port 0 picks a free one; see ``.port``). Per membership change: ``epoch_secret`` (hand it to
    the members in their JoinGroup, over gRPC only), then ``open_epoch``; per publish, after the
    manifest went out over gRPC: ``send_weights`` the weights of a manifest from
    ``lpreg_core.weight_sync.plan_manifest`` (or ``send`` the flat buffers returned by
    ``lpreg_core.weights.build_manifest``).
    """

    def __init__(
        self,
        config: BroadcastConfig,
        device: torch.device | str = "cpu",
        *,
        device_host: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.backend: GroupBackend = resolve_backend(config.backend, self.device)
        self.host = config.store_host
        # What members are told to dial (JoinGroup.store_host); differs from the bind address
        # when the learner binds a wildcard behind a Service.
        self.advertise_host = config.advertise_host or config.store_host
        # Gloo binds its own sockets: on the store's address unless that is a wildcard, in which
        # case Gloo's default (this host's resolved name) is the address members can reach.
        self._device_host = device_host or (None if _is_wildcard(self.host) else self.host)
        # TCPStore on its own listens on every interface; a socket bound here and handed over
        # keeps the store on the configured address only.
        try:
            listener = socket.create_server((self.host, config.store_port), backlog=1024)
        except OSError as e:
            raise OSError(
                f"cannot bind the weight-broadcast store on {self.host}:{config.store_port}: {e}"
            ) from e
        self.port = int(listener.getsockname()[1])
        fd = listener.detach()  # the store owns the descriptor from here on
        try:
            self._store: dist.TCPStore | None = dist.TCPStore(
                self.host,
                self.port,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=_STORE_CLIENT_TIMEOUT_S),
                master_listen_fd=fd,
            )
        except RuntimeError:
            os.close(fd)
            raise
        self._group: _Group | None = None
        self._last_epoch = -1
        # Secrets drawn for epochs not opened yet, and the open (or last) epoch's sealed keys.
        self._secrets: dict[int, bytes] = {}
        self._epoch_store: SealedStore | None = None
        self._keys: EpochKeys | None = None
        self._kept_prefixes: tuple[str, ...] = ()
        # Bucket buffers kept between buckets and publishes, and the thread that authenticates
        # a bucket while it is on the wire.
        self._spare: list[torch.Tensor] = []
        # Buffers of the buckets on their way, by address.
        self._lent: dict[int, torch.Tensor] = {}
        self._hash_pool: ThreadPoolExecutor | None = None

    @property
    def epoch(self) -> int | None:
        """The open epoch, or None."""
        return self._group.epoch if self._group is not None else None

    @property
    def world_size(self) -> int | None:
        """World size of the open epoch (learner included), or None."""
        return self._group.world_size if self._group is not None else None

    def _require_store(self) -> dist.TCPStore:
        if self._store is None:
            raise RuntimeError("the weight sender is closed")
        return self._store

    def epoch_secret(self, epoch: int) -> bytes:
        """The rendezvous secret of ``epoch``: fresh random bytes the first time it is asked for.

        Hand it to the epoch's members in their JoinGroup event, and to nobody else: without it a
        process can neither claim a rank nor be believed by the learner or the members.
        """
        if epoch <= self._last_epoch:
            raise ValueError(f"epochs must increase: {epoch} after {self._last_epoch}")
        secret = self._secrets.get(epoch)
        if secret is None:
            secret = self._secrets[epoch] = new_secret()
        return secret

    def open_epoch(self, epoch: int, world_size: int, join_timeout_s: float) -> None:
        """Form the group of ``epoch`` with ranks 0..world_size-1, or raise.

        Waits until every member rank has announced itself with the epoch's secret
        (``epoch_secret``, which must have been drawn first), then builds the group. Raises
        ``MembersMissing`` if some never announce before the deadline (an announcement that is
        not sealed under the secret for that rank and world size counts as none),
        ``BroadcastFailed`` if the group cannot be connected (a member died after announcing). An
        open epoch is closed first.
        """
        store = self._require_store()
        if epoch <= self._last_epoch:
            raise ValueError(f"epochs must increase: {epoch} after {self._last_epoch}")
        if world_size < 2:
            raise ValueError(
                f"an epoch needs the learner and at least one member, got {world_size}"
            )
        secret = self._secrets.get(epoch)
        if secret is None:
            raise ValueError(
                f"epoch {epoch} has no secret: call epoch_secret({epoch}) and hand it to the "
                "members in their JoinGroup first"
            )
        deadline = _Deadline(join_timeout_s)
        self.close_epoch()
        self._last_epoch = epoch
        self._secrets = {e: s for e, s in self._secrets.items() if e > epoch}
        keys = self._keys = EpochKeys(secret, epoch)
        epoch_store = self._epoch_store = SealedStore.for_epoch(store, keys)
        self._sweep(store, keys.prefix)
        pending = {rank: _joined_key(rank) for rank in range(1, world_size)}
        offers: list[list[str]] = []
        forged: set[int] = set()
        while True:
            for rank, key in list(pending.items()):
                if not epoch_store.check([key]):
                    continue
                claim = epoch_store.read_sealed(key)
                member = None if claim is None else _claim_member(claim, epoch, rank, world_size)
                if claim is None or member is None:
                    if rank not in forged:
                        forged.add(rank)
                        log.warning(
                            "epoch %d: ignoring an announcement of rank %d that does not carry "
                            "the epoch's secret and rank assignment",
                            epoch,
                            rank,
                        )
                    continue
                log.debug("epoch %d: rank %d is %s", epoch, rank, member)
                offers.append(_claim_macs(claim))
                del pending[rank]
            if not pending:
                break
            if deadline.expired():
                missing = MembersMissing(epoch, list(pending), join_timeout_s)
                epoch_store.set(_ABORTED_KEY, str(missing))
                raise missing
            time.sleep(min(JOIN_POLL_INTERVAL_S, deadline.remaining_s()))
        mac = choose_mac(offers)
        epoch_store.set(_MEMBERS_KEY, _epoch_start(world_size, mac))
        try:
            pg = _new_backend(
                epoch_store.child("pg"),
                0,
                world_size,
                self.backend,
                max(deadline.remaining_s(), 0.001),
                self.device,
                self._device_host,
            )
        except RuntimeError as e:
            message = (
                f"epoch {epoch}: could not connect the {self.backend} group of {world_size}: {e}"
            )
            epoch_store.set(_ABORTED_KEY, message)
            raise BroadcastFailed(message) from e
        self._group = _Group(pg, epoch, 0, world_size, self.backend, self.device, mac)
        log.info(
            "epoch %d open: %s group of %d, buckets authenticated with %s",
            epoch,
            self.backend,
            world_size,
            mac,
        )

    def _sweep(self, store: dist.TCPStore, prefix: str) -> None:
        """Delete every key but those of this epoch and the previous one (members of the previous
        epoch may still be reading its ``aborted``): whatever anyone wrote into the store lives at
        most two epochs."""
        self._kept_prefixes = (*self._kept_prefixes[-1:], prefix + "/")
        try:
            stale = [k for k in store.list_keys() if not k.startswith(self._kept_prefixes)]
            for key in stale[:_SWEEP_MAX_KEYS]:
                store.delete_key(key)
        except RuntimeError as e:  # a store without list_keys: nothing is swept
            log.debug("store sweep skipped: %s", e)
            return
        if len(stale) > _SWEEP_MAX_KEYS:
            log.warning(
                "the weight-sync store holds %d keys of no current epoch (someone is writing "
                "into it); deleted %d",
                len(stale),
                _SWEEP_MAX_KEYS,
            )

    def send(
        self, flats: Sequence[torch.Tensor], timeout_s: float, *, publish_id: str | None = None
    ) -> None:
        """Broadcast flat buckets packed beforehand and wait until all members verified them.

        ``publish_id`` is the ``checksum`` of the manifest the members received; by default the
        sha256 of the buckets, as ``lpreg_core.weights.build_manifest`` puts it there. Raises
        ``BroadcastFailed`` (epoch closed: open a new one) when a peer dies or the deadline
        passes, ``ChecksumMismatch`` (epoch still open) when some member's bytes did not
        authenticate.
        """
        for index, flat in enumerate(flats):
            if flat.dim() != 1 or not flat.is_contiguous():
                raise ValueError(f"bucket {index}: expected a flat contiguous tensor")
        if publish_id is None:
            publish_id = checksum_of_buckets(flats)
        self._send_buckets(publish_id, enumerate(flats), len(flats), _Deadline(timeout_s))

    def send_weights(
        self,
        manifest: WeightManifest,
        weights: Iterable[tuple[str, torch.Tensor]],
        timeout_s: float,
    ) -> None:
        """Broadcast a publish planned by ``lpreg_core.weight_sync.plan_manifest``, packing each
        bucket from ``weights`` only while the previous one is on the wire.

        Besides the tensors ``weights`` is producing, the learner holds at most
        ``MAX_BUCKETS_IN_FLIGHT`` buckets on their way plus one open bucket per dtype; their
        buffers are kept for the next publish. Raises like ``send``, and ``ValueError`` (epoch
        closed) when ``weights`` does not match the manifest.
        """
        buckets = fill_buckets(manifest, weights, self._take_buffer)
        self._send_buckets(
            manifest.checksum,
            ((b.index, flat) for b, flat in buckets),
            len(manifest.buckets),
            _Deadline(timeout_s),
        )

    def _take_buffer(self, bucket: BucketSpec, device: torch.device) -> torch.Tensor:
        """A flat buffer for ``bucket``: a kept one when one is large enough, else a new one."""
        for i, buffer in enumerate(self._spare):
            if buffer.device == device and buffer.numel() >= bucket.nbytes:
                del self._spare[i]
                break
        else:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        if bucket.nbytes > 0:
            self._lent[buffer.untyped_storage().data_ptr()] = buffer
        return buffer[: bucket.nbytes].view(dtype_from_name(bucket.dtype))

    def _give_back(self, flat: torch.Tensor) -> None:
        """Keep the buffer under ``flat`` (the largest few) if it is one of ours (a bucket sent
        from a tensor of the weights is not)."""
        if flat.numel() == 0:
            return
        buffer = self._lent.pop(flat.untyped_storage().data_ptr(), None)
        if buffer is not None:
            self._spare.append(buffer)
            self._spare.sort(key=lambda b: b.numel(), reverse=True)
            del self._spare[MAX_BUCKETS_IN_FLIGHT:]

    def _send_buckets(
        self,
        publish_id: str,
        buckets: Iterator[tuple[int, torch.Tensor]],
        num_buckets: int,
        deadline: _Deadline,
    ) -> None:
        group, keys = self._group, self._keys
        if group is None or keys is None:
            raise RuntimeError("send() needs an open epoch: call open_epoch() first")
        hasher = self._hasher()
        self._lent = {}
        macs: list[Future[bytes] | None] = [None] * num_buckets
        in_flight: deque[_InFlight] = deque()
        device = self.device
        try:
            for index, flat in buckets:
                if not 0 <= index < num_buckets or macs[index] is not None:
                    raise ValueError(f"bucket {index} is not the next of {num_buckets}")
                device = flat.device
                what = f"broadcast of bucket {index}/{num_buckets}"
                works = [group.start_broadcast(c, deadline, what) for c in wire_chunks(flat)]
                nbytes = flat.numel() * flat.element_size()
                mac = keys.bucket_mac(publish_id, index, nbytes, group.mac)
                digest = macs[index] = hasher.submit(_digest, mac, flat)
                in_flight.append(_InFlight(what, flat, works, digest))
                del flat
                # Pack the next bucket while this one is on the wire, never more than that.
                while len(in_flight) >= MAX_BUCKETS_IN_FLIGHT:
                    self._retire(group, in_flight.popleft(), deadline)
            while in_flight:
                self._retire(group, in_flight.popleft(), deadline)
            if any(m is None for m in macs):
                raise ValueError(
                    f"only {sum(m is not None for m in macs)} of {num_buckets} buckets"
                )
            trailer = b"".join(m.result() for m in macs if m is not None)
            tags = torch.frombuffer(bytearray(trailer), dtype=torch.uint8).to(device)
            group.broadcast(tags, deadline, "bucket MACs")
            failures = torch.zeros(1, dtype=torch.int32, device=device)
            group.allreduce_sum(failures, deadline, "checksum confirmation")
        except BroadcastFailed as e:
            self._abort_epoch(str(e))
            raise
        except BaseException as e:
            # The members are somewhere in the publish: fail it for them too.
            self._abort_epoch(f"the publish could not be completed: {e}")
            raise
        num_failed = int(failures.item())
        if num_failed:
            raise ChecksumMismatch(
                f"epoch {group.epoch}: {num_failed} of {group.world_size - 1} members received "
                "bytes that do not authenticate for the manifest they were given"
            )

    def _retire(self, group: _Group, sent: _InFlight, deadline: _Deadline) -> None:
        for work in sent.works:
            group.wait(work, deadline, sent.what)
        sent.mac.result()
        self._give_back(sent.flat)

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="lpreg-weights-mac")
        return self._hash_pool

    def _abort_epoch(self, reason: str, *, failed: bool = True) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        if self._epoch_store is not None:
            try:
                self._epoch_store.set(_ABORTED_KEY, reason)
            except RuntimeError as e:
                log.warning("epoch %d: could not mark it aborted in the store: %s", group.epoch, e)
        group.release()
        if failed:
            log.warning("epoch %d aborted: %s", group.epoch, reason)
        else:
            log.info("epoch %d closed", group.epoch)

    def close_epoch(self) -> None:
        """Drop the current group (no-op without one); members blocked in it give up promptly."""
        self._abort_epoch("closed by the learner", failed=False)

    def close(self) -> None:
        """Close the epoch and stop the store. Idempotent."""
        self.close_epoch()
        self._store = None
        self._epoch_store = None
        self._spare, self._lent = [], {}
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _InFlight:
    what: str
    flat: torch.Tensor
    works: list[Work]
    mac: Future[bytes]


def _digest(mac: BucketMac, flat: torch.Tensor) -> bytes:
    feed(mac, flat)
    return mac.digest()

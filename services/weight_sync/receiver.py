"""Generator side of the weight broadcast: join an epoch, receive and check each publish.

A publish is received bucket by bucket (``WeightReceiver.receive_buckets``) and loaded as it
arrives, so a worker's receive memory is bounded by the bucket size, never the model's. The next
bucket arrives while the consumer loads the current one, and every bucket is authenticated
(``EpochKeys.bucket_mac``) on a worker thread as it lands.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Work

from lpreg_core.weights import BucketSpec, TensorSpec, WeightManifest, dtype_from_name
from lpreg_core.weights import validate_manifest as _validate_manifest
from services.weight_sync.group import (
    _ABORTED_KEY,
    _MEMBERS_KEY,
    JOIN_POLL_INTERVAL_S,
    BroadcastError,
    BroadcastFailed,
    ChecksumMismatch,
    GroupBackend,
    _Deadline,
    _Group,
    _joined_claim,
    _joined_key,
    _local_address_towards,
    _new_backend,
    _read_epoch_start,
    check_receive_target,
)
from services.weight_sync.integrity import MAC_BYTES, BufferAccount, feed, wire_chunks
from services.weight_sync.rendezvous import EpochKeys, SealedStore, check_secret

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class _Incoming:
    """A bucket whose broadcasts are started: its buffer, one operation per wire chunk."""

    bucket: BucketSpec
    flat: torch.Tensor
    chunks: list[tuple[torch.Tensor, Work]]


class BucketStream:
    """One publish arriving bucket by bucket; see ``WeightReceiver.receive_buckets``.

    An iterator of ``(name, tensor)`` in bucket order and, within a bucket, offset order.
    ``error`` holds what ended it early, ``num_tensors`` how many tensors were handed out,
    ``wait_s`` the time spent waiting for the network.

    While the consumer loads one bucket the next one is already arriving, and a worker thread
    authenticates each bucket as its chunks land; the next bucket is started only once the one
    before the current is gone (consumer and authentication done with it), so at most two
    buckets are alive.
    """

    def __init__(
        self,
        receiver: WeightReceiver,
        group: _Group,
        keys: EpochKeys,
        manifest: WeightManifest,
        target: torch.device,
        deadline: _Deadline,
        abort_reason: Callable[[], str | None],
    ) -> None:
        self._receiver = receiver
        self._group = group
        self._keys = keys
        self.manifest = manifest
        self._target = target
        self._deadline = deadline
        self._abort_reason = abort_reason
        members: dict[int, list[TensorSpec]] = {b.index: [] for b in manifest.buckets}
        for spec in manifest.tensors:
            members[spec.bucket].append(spec)
        self._members = {i: sorted(specs, key=lambda s: s.offset) for i, specs in members.items()}
        self._next_bucket = 0
        # The next bucket, already on its way; and the bucket before the current one, which
        # must be gone before another is started.
        self._incoming: _Incoming | None = None
        self._previous: weakref.ref[torch.Tensor] | None = None
        self._current: weakref.ref[torch.Tensor] | None = None
        # The current bucket's tensors not handed out yet, last one first.
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._macs: list[Future[bytes]] = []
        self._done = False
        self.error: BroadcastError | None = None
        self.num_tensors = 0
        self.num_buckets_received = 0
        self.wait_s = 0.0

    @property
    def done(self) -> bool:
        """True once every bucket was received and confirmed, or the stream failed or closed."""
        return self._done

    def __iter__(self) -> BucketStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._done:
            raise StopIteration
        self._prefetch()
        while not self._pending:
            if self._next_bucket == len(self.manifest.buckets):
                self._confirm(raise_mismatch=True)
                raise StopIteration
            self._pending = self._land_next()
            self._prefetch()
        self.num_tensors += 1
        return self._pending.pop()

    def _what(self, index: int) -> str:
        return f"version {self.manifest.version} bucket {index}/{len(self.manifest.buckets)}"

    def _prefetch(self) -> None:
        """Start the next bucket's broadcasts if the one before the current bucket is gone."""
        if self._incoming is not None or self._next_bucket >= len(self.manifest.buckets):
            return
        if self._previous is not None and self._previous() is not None:
            return
        self._incoming = self._start(self.manifest.buckets[self._next_bucket])

    def _start(self, bucket: BucketSpec) -> _Incoming:
        flat = self._receiver._buffers.empty(
            bucket.numel, dtype_from_name(bucket.dtype), self._target
        )
        what = self._what(bucket.index)
        chunks = self._collective(
            lambda: [
                (chunk, self._group.start_broadcast(chunk, self._deadline, what))
                for chunk in wire_chunks(flat)
            ]
        )
        return _Incoming(bucket, flat, chunks)

    def _land_next(self) -> list[tuple[str, torch.Tensor]]:
        """Wait for the next bucket (started now if it was not yet), hand its chunks to the
        authenticating thread as they land; its tensors, last one first."""
        if self._incoming is None and self._previous is not None and self._previous() is not None:
            # The bucket before the current one may still be held by its authentication: the
            # worker thread runs in order, so once that bucket's MAC is done it has let go.
            self._macs[-2].result()
        incoming = self._incoming or self._start(self.manifest.buckets[self._next_bucket])
        self._incoming = None
        self._next_bucket += 1
        bucket, flat = incoming.bucket, incoming.flat
        what = self._what(bucket.index)
        mac = self._keys.bucket_mac(
            self.manifest.checksum, bucket.index, bucket.nbytes, self._group.mac
        )
        hasher = self._receiver._hasher()
        for chunk, work in incoming.chunks:
            start = time.monotonic()
            self._wait(work, what)
            self.wait_s += time.monotonic() - start
            hasher.submit(feed, mac, chunk, self._receiver._buffers.empty)
        self._macs.append(hasher.submit(mac.digest))
        del incoming
        self.num_buckets_received += 1
        self._previous, self._current = self._current, weakref.ref(flat)
        return [
            (s.name, flat[s.offset : s.offset + s.numel].view(s.shape))
            for s in reversed(self._members[bucket.index])
        ]

    def _wait(self, work: Work, what: str) -> None:
        self._collective(lambda: self._group.wait(work, self._deadline, what, self._abort_reason))

    def _collective(self, run: Callable[[], _T]) -> _T:
        try:
            return run()
        except BroadcastFailed as e:
            self._done = True
            self.error = e
            self._pending = []
            self._incoming = None
            self._receiver._stream_failed(self)
            raise

    def _confirm(self, *, raise_mismatch: bool) -> None:
        """Receive the learner's MACs, tell it whether every bucket authenticated (one
        all-reduce), then end the stream."""
        tags = torch.empty(MAC_BYTES * len(self.manifest.buckets), dtype=torch.uint8)
        received = tags.to(self._target)
        self._collective(
            lambda: self._group.broadcast(
                received, self._deadline, "bucket MACs", self._abort_reason
            )
        )
        expected = bytes(received.cpu().numpy().tobytes())
        bad = [
            index
            for index, future in enumerate(self._macs)
            if not hmac.compare_digest(
                future.result(), expected[index * MAC_BYTES : (index + 1) * MAC_BYTES]
            )
        ]
        failed = torch.tensor([int(bool(bad))], dtype=torch.int32).to(self._target)
        self._collective(
            lambda: self._group.allreduce_sum(
                failed, self._deadline, "checksum confirmation", self._abort_reason
            )
        )
        self._done = True
        self._macs = []
        if bad:
            self.error = ChecksumMismatch(
                f"epoch {self._group.epoch}, rank {self._group.rank}: version "
                f"{self.manifest.version} (manifest {self.manifest.checksum[:16]}): "
                f"{len(bad)} of {len(self.manifest.buckets)} buckets (first: {bad[0]}) do not "
                "authenticate; the bytes were altered on the way or the manifest is not the "
                "learner's"
            )
            if raise_mismatch:
                raise self.error

    def close(self) -> None:
        """End the stream. Closed before its last bucket, it receives, checks and discards the
        rest, so the publish completes for the learner and the other members. Never raises: a
        failure or mismatch met on the way is in ``error``."""
        if self._done:
            return
        self._pending = []
        try:
            while self._next_bucket < len(self.manifest.buckets):
                self._land_next()
                self._prefetch()
            self._confirm(raise_mismatch=False)
        except BroadcastFailed:
            pass
        if self.error is not None:
            log.warning("publish of v%d closed early: %s", self.manifest.version, self.error)

    def _abandon(self) -> None:
        """The group is gone: nothing more can be received."""
        if not self._done:
            self._done = True
            self._pending = []
            self._incoming = None
            if self.error is None:
                self.error = BroadcastFailed(
                    f"version {self.manifest.version}: the member left the group mid-publish"
                )

    def __enter__(self) -> BucketStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class WeightReceiver:
    """Generator side: one per worker (rank >= 1). ``join`` an epoch, then ``receive_buckets``
    each publish and load it as it arrives."""

    def __init__(self, *, device_host: str | None = None) -> None:
        # Address Gloo binds on; by default the local address on the route to the learner's store.
        self._device_host = device_host
        self._store: dist.TCPStore | None = None
        self._store_address: tuple[str, int] | None = None
        self._group: _Group | None = None
        self._epoch_store: SealedStore | None = None
        self._stream: BucketStream | None = None
        self._buffers = BufferAccount()
        self._hash_pool: ThreadPoolExecutor | None = None

    @property
    def epoch(self) -> int | None:
        """The joined epoch, or None."""
        return self._group.epoch if self._group is not None else None

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
        device: torch.device | str | None = None,
        secret: bytes = b"",
    ) -> None:
        """Announce this rank in ``epoch`` and connect its group (blocks until formed).

        ``secret`` is the epoch's rendezvous secret from the JoinGroup event (required: every
        store value is sealed under it). ``device`` is where received weights will live
        (default: CPU for Gloo, the current CUDA device for NCCL). Raises ``ValueError`` before
        contacting anyone when the settings cannot work (no secret, an NCCL group with a CPU
        ``device`` or without CUDA), ``BroadcastFailed`` if the store is unreachable, the learner
        gave up on the epoch, or the group cannot be connected before ``timeout_s``.
        """
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown broadcast backend {backend!r} (expected gloo or nccl)")
        if not 1 <= rank < world_size:
            raise ValueError(f"member rank must be in 1..{world_size - 1}, got {rank}")
        group_backend: GroupBackend = "nccl" if backend == "nccl" else "gloo"
        if device is None:
            if backend == "nccl" and not torch.cuda.is_available():
                raise ValueError(
                    "the learner broadcasts over NCCL (broadcast.backend), but this generator "
                    "has no CUDA device; set broadcast.backend=gloo"
                )
            device = (
                torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
            )
        group_device = check_receive_target(backend, device)
        check_secret(secret)
        deadline = _Deadline(timeout_s)
        self.leave()
        context = f"epoch {epoch}, rank {rank}/{world_size}, store {store_host}:{store_port}"
        keys = EpochKeys(secret, epoch)
        store = self._connect_store(store_host, store_port, deadline, context)
        epoch_store = SealedStore.for_epoch(store, keys)
        claim = _joined_claim(epoch, rank, world_size, f"{socket.gethostname()}:{os.getpid()}")
        try:
            epoch_store.set(_joined_key(rank), claim)
        except dist.DistError:
            # A learner restarted on the same address leaves our cached connection dead.
            self._drop_store()
            store = self._connect_store(store_host, store_port, deadline, context)
            epoch_store = SealedStore.for_epoch(store, keys)
        try:
            epoch_store.set(_joined_key(rank), claim)
            while True:
                # Only values sealed under the secret count: anyone can write plain keys here.
                reason = epoch_store.read_sealed(_ABORTED_KEY)
                if reason is not None:
                    raise BroadcastFailed(
                        f"{context}: the learner abandoned the epoch "
                        f"({reason.decode(errors='replace')})"
                    )
                members_value = epoch_store.read_sealed(_MEMBERS_KEY)
                if members_value is not None:
                    break
                if deadline.expired():
                    raise BroadcastFailed(
                        f"{context}: the learner did not start the epoch within {timeout_s:.1f}s"
                    )
                time.sleep(min(JOIN_POLL_INTERVAL_S, deadline.remaining_s()))
            members, mac = _read_epoch_start(members_value)
        except dist.DistError as e:
            self._drop_store()
            raise BroadcastFailed(f"{context}: lost the learner's store: {e}") from e
        if members != world_size:
            raise BroadcastFailed(
                f"{context}: the learner formed the epoch with world size {members}"
            )
        device_host = self._device_host or _local_address_towards(store_host, store_port)
        try:
            pg = _new_backend(
                epoch_store.child("pg"),
                rank,
                world_size,
                group_backend,
                max(deadline.remaining_s(), 0.001),
                group_device,
                device_host,
            )
        except RuntimeError as e:
            raise BroadcastFailed(f"{context}: could not connect the {backend} group: {e}") from e
        self._group = _Group(pg, epoch, rank, world_size, group_backend, group_device, mac)
        self._epoch_store = epoch_store

    def _connect_store(
        self, host: str, port: int, deadline: _Deadline, context: str
    ) -> dist.TCPStore:
        if self._store is not None and self._store_address == (host, port):
            return self._store
        self._drop_store()
        try:
            store = dist.TCPStore(
                host,
                port,
                is_master=False,
                timeout=timedelta(seconds=max(deadline.remaining_s(), 0.001)),
            )
        except RuntimeError as e:
            raise BroadcastFailed(f"{context}: cannot reach the learner's store: {e}") from e
        self._store, self._store_address = store, (host, port)
        return store

    def _drop_store(self) -> None:
        self._store, self._store_address = None, None

    @property
    def peak_buffer_bytes(self) -> int:
        """Most bytes of receive buffers alive at once during the last (or current) publish.

        Counts every buffer the receive path allocates (bucket buffers and the host staging of
        the authentication), for as long as anything, the consumer included, still references it.
        """
        return self._buffers.peak_bytes

    @property
    def live_buffer_bytes(self) -> int:
        """Bytes of receive buffers alive now."""
        return self._buffers.live_bytes

    def receive_buckets(
        self, manifest: WeightManifest, device: torch.device | str, timeout_s: float
    ) -> BucketStream:
        """Receive one publish bucket by bucket: iterate the result for ``(name, tensor)``.

        The tensors are views into the bucket just received and are valid until the consumer
        drops them. The next bucket starts arriving while the consumer loads the current one, as
        soon as nothing (consumer or authentication) holds the bucket before the current one, so
        at most two buckets are alive at once. Tensors come in manifest dtype; loaders cast them
        to their parameters' dtypes.

        Iterating raises ``BroadcastFailed`` (the group is released; wait for the next join) on a
        dead learner, an abandoned epoch or the deadline, which covers receiving and consuming;
        after the last tensor it raises ``ChecksumMismatch`` if some bucket does not authenticate
        under the epoch's key for this manifest (``manifest.checksum`` names the publish), that
        is the bytes were altered or the manifest differs from the learner's (the group stays
        usable). Either way the consumer may already have
        loaded some of the tensors. Close the stream (``with``) when done: closing it early
        receives and discards the rest, so the learner and the other members finish the publish.
        """
        group, epoch_store = self._group, self._epoch_store
        if group is None or epoch_store is None or self._store is None:
            raise RuntimeError("receive_buckets() needs a joined epoch: call join() first")
        _validate_manifest(manifest)
        target = check_receive_target(group.backend, device)
        if self._stream is not None:
            # The previous publish must be off the wire before this one can start.
            self._stream.close()

        def abort_reason() -> str | None:
            try:
                reason = epoch_store.read_sealed(_ABORTED_KEY)
                if reason is not None:
                    return reason.decode(errors="replace")
            except dist.DistError as e:
                return f"lost the learner's store: {e}"
            return None

        self._buffers.reset_peak()
        self._stream = BucketStream(
            self, group, epoch_store.keys, manifest, target, _Deadline(timeout_s), abort_reason
        )
        return self._stream

    def discard(self, manifest: WeightManifest, timeout_s: float) -> None:
        """Receive a publish and throw it away, keeping this member in step with the group.

        For a publish the consumer rejected before loading anything. Raises ``BroadcastFailed``
        like ``receive_buckets``; a checksum mismatch is reported to the learner and logged.
        """
        device = self._group.device if self._group is not None else "cpu"
        stream = self.receive_buckets(manifest, device, timeout_s)
        stream.close()
        if isinstance(stream.error, BroadcastFailed):
            raise stream.error

    def _hasher(self) -> ThreadPoolExecutor:
        """The thread that authenticates received chunks (in order) while the next arrive."""
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="lpreg-weights-mac")
        return self._hash_pool

    def _stream_failed(self, stream: BucketStream) -> None:
        if stream is self._stream:
            self.leave()

    def leave(self) -> None:
        """Drop the group of the current epoch (no-op without one); the store client stays."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream._abandon()
        group, self._group = self._group, None
        self._epoch_store = None
        if group is not None:
            group.release()

    def close(self) -> None:
        """Leave and disconnect from the store. Idempotent."""
        self.leave()
        self._drop_store()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
            self._hash_pool = None

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

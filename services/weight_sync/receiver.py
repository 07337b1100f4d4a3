"""Generator side of the weight broadcast: join an epoch, receive and check each publish.

A publish is received bucket by bucket (``WeightReceiver.receive_buckets``) and loaded as it
arrives, so a worker's receive memory is bounded by the bucket size, never the model's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import torch
import torch.distributed as dist

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
    check_receive_target,
)
from services.weight_sync.rendezvous import EpochKeys, SealedStore, check_secret

log = logging.getLogger(__name__)

# Device buckets are hashed through a host buffer of at most this size, so the checksum costs a
# bounded amount of host memory whatever the bucket size.
HASH_STAGING_BYTES = 16 * 1024 * 1024


class _BufferAccount:
    """Bytes of receive buffers alive now and at most; a buffer counts until it is freed."""

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        nbytes = buffer.numel() * buffer.element_size()
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # Views handed to the consumer keep the buffer alive (their ``_base``); it counts until
        # the last of them is gone.
        weakref.finalize(buffer, self._freed, nbytes)
        return buffer

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


def _hash_bucket(digest: hashlib._Hash, flat: torch.Tensor, buffers: _BufferAccount) -> None:
    """Feed the raw bytes of ``flat`` to ``digest`` (as ``checksum_of_buckets`` does)."""
    data = flat.detach().reshape(-1).view(torch.uint8)
    if data.device.type == "cpu":
        digest.update(data.numpy().data)
        return
    staging = buffers.empty(min(data.numel(), HASH_STAGING_BYTES), torch.uint8, torch.device("cpu"))
    for start in range(0, data.numel(), staging.numel()):
        chunk = data[start : start + staging.numel()]
        part = staging[: chunk.numel()]
        part.copy_(chunk)
        digest.update(part.numpy().data)


class BucketStream:
    """One publish arriving bucket by bucket; see ``WeightReceiver.receive_buckets``.

    An iterator of ``(name, tensor)`` in bucket order and, within a bucket, offset order.
    ``error`` holds what ended it early, ``num_tensors`` how many tensors were handed out,
    ``wait_s`` the time spent waiting for the network.
    """

    def __init__(
        self,
        receiver: WeightReceiver,
        group: _Group,
        manifest: WeightManifest,
        target: torch.device,
        deadline: _Deadline,
        abort_reason: Callable[[], str | None],
    ) -> None:
        self._receiver = receiver
        self._group = group
        self.manifest = manifest
        self._target = target
        self._deadline = deadline
        self._abort_reason = abort_reason
        members: dict[int, list[TensorSpec]] = {b.index: [] for b in manifest.buckets}
        for spec in manifest.tensors:
            members[spec.bucket].append(spec)
        self._members = {i: sorted(specs, key=lambda s: s.offset) for i, specs in members.items()}
        self._next_bucket = 0
        # The current bucket's tensors not handed out yet, last one first.
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._digest = hashlib.sha256()
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
        while not self._pending:
            if self._next_bucket == len(self.manifest.buckets):
                self._confirm(raise_mismatch=True)
                raise StopIteration
            self._pending = self._receive_bucket()
        self.num_tensors += 1
        return self._pending.pop()

    def _receive_bucket(self) -> list[tuple[str, torch.Tensor]]:
        bucket: BucketSpec = self.manifest.buckets[self._next_bucket]
        self._next_bucket += 1
        flat = self._receiver._buffers.empty(
            bucket.numel, dtype_from_name(bucket.dtype), self._target
        )
        if bucket.numel > 0:
            start = time.monotonic()
            self._collective(
                lambda: self._group.broadcast(
                    flat,
                    self._deadline,
                    f"version {self.manifest.version} bucket {bucket.index}/"
                    f"{len(self.manifest.buckets)}",
                    self._abort_reason,
                )
            )
            self.wait_s += time.monotonic() - start
            _hash_bucket(self._digest, flat, self._receiver._buffers)
        self.num_buckets_received += 1
        return [
            (s.name, flat[s.offset : s.offset + s.numel].view(s.shape))
            for s in reversed(self._members[bucket.index])
        ]

    def _collective(self, run: Callable[[], None]) -> None:
        try:
            run()
        except BroadcastFailed as e:
            self._done = True
            self.error = e
            self._pending = []
            self._receiver._stream_failed(self)
            raise

    def _confirm(self, *, raise_mismatch: bool) -> None:
        """Tell the learner whether the bytes matched (one all-reduce), then end the stream."""
        actual = self._digest.hexdigest()
        mismatch = actual != self.manifest.checksum
        failed = torch.tensor([int(mismatch)], dtype=torch.int32).to(self._target)
        self._collective(
            lambda: self._group.allreduce_sum(
                failed, self._deadline, "checksum confirmation", self._abort_reason
            )
        )
        self._done = True
        if mismatch:
            self.error = ChecksumMismatch(
                f"epoch {self._group.epoch}, rank {self._group.rank}: version "
                f"{self.manifest.version} arrived with sha256 {actual}, manifest says "
                f"{self.manifest.checksum}"
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
                self._receive_bucket()
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
        self._buffers = _BufferAccount()

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
            members = int(members_value)
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
        self._group = _Group(pg, epoch, rank, world_size, group_backend, group_device)
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
        the checksum), for as long as anything, the consumer included, still references it.
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
        drops them; the next bucket is received only when the consumer asks for the tensor after
        the last one of the current bucket, so at most two buckets are alive at once (the one
        being consumed and the previous one while the consumer still holds its last tensor).
        Tensors come in manifest dtype; loaders cast them to their parameters' dtypes.

        Iterating raises ``BroadcastFailed`` (the group is released; wait for the next join) on a
        dead learner, an abandoned epoch or the deadline, which covers receiving and consuming;
        after the last tensor it raises ``ChecksumMismatch`` if the bytes differ from
        ``manifest.checksum`` (the group stays usable). Either way the consumer may already have
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
            self, group, manifest, target, _Deadline(timeout_s), abort_reason
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

    def __enter__(self) -> WeightReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

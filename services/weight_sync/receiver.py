"""Generator side of the weight broadcast: join an epoch, receive and check each publish."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from services.weight_sync.group import (
    GroupBackend,
    MembersMissing,
    BroadcastFailed,
    ChecksumMismatch,
    _Deadline,
    _Group,
)

if TYPE_CHECKING:
    from lpreg_core.config import BroadcastConfig

log = logging.getLogger(__name__)


class WeightReceiver:
    """Generator side: one per worker (rank >= 1). ``join`` an epoch, ``receive`` each publish."""

    def __init__(self, *, device_host: str | None = None) -> None:
        # Address Gloo binds on; by default the local address on the route to the learner's store.
        self._device_host = device_host
        self._store: dist.TCPStore | None = None
        self._store_address: tuple[str, int] | None = None
        self._group: _Group | None = None

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
    ) -> None:
        """Announce this rank in ``epoch`` and connect its group (blocks until formed).

        ``device`` is where received weights will live (default: CPU for Gloo, the current CUDA
        device for NCCL). Raises ``BroadcastFailed`` if the store is unreachable, the learner gave
        up on the epoch, or the group cannot be connected before ``timeout_s``.
        """
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown broadcast backend {backend!r} (expected gloo or nccl)")
        if not 1 <= rank < world_size:
            raise ValueError(f"member rank must be in 1..{world_size - 1}, got {rank}")
        group_backend: GroupBackend = "nccl" if backend == "nccl" else "gloo"
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
            )
        group_device = torch.device(device)
        deadline = _Deadline(timeout_s)
        self.leave()
        context = f"epoch {epoch}, rank {rank}/{world_size}, store {store_host}:{store_port}"
        store = self._connect_store(store_host, store_port, deadline, context)
        epoch_store = _epoch_store(store, epoch)
        announce = f"{socket.gethostname()}:{os.getpid()}"
        try:
            epoch_store.set(_joined_key(rank), announce)
        except dist.DistError:
            # A learner restarted on the same address leaves our cached connection dead.
            self._drop_store()
            store = self._connect_store(store_host, store_port, deadline, context)
            epoch_store = _epoch_store(store, epoch)
        try:
            epoch_store.set(_joined_key(rank), announce)
            while True:
                if epoch_store.check([_ABORTED_KEY]):
                    reason = epoch_store.get(_ABORTED_KEY).decode(errors="replace")
                    raise BroadcastFailed(f"{context}: the learner abandoned the epoch ({reason})")
                if epoch_store.check([_MEMBERS_KEY]):
                    break
                if deadline.expired():
                    raise BroadcastFailed(
                        f"{context}: the learner did not start the epoch within {timeout_s:.1f}s"
                    )
                time.sleep(min(JOIN_POLL_INTERVAL_S, deadline.remaining_s()))
            members = int(epoch_store.get(_MEMBERS_KEY))
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
                dist.PrefixStore("pg", epoch_store),
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

    def receive(
        self, manifest: WeightManifest, device: torch.device | str, timeout_s: float
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive one publish into fresh flat buffers; returns named views into them.

        Raises ``BroadcastFailed`` (the group is released; wait for the next join) on a dead
        learner, an abandoned epoch or the deadline, ``ChecksumMismatch`` if the bytes differ from
        ``manifest.checksum`` (the group stays usable).
        """
        group = self._group
        if group is None or self._store is None:
            raise RuntimeError("receive() needs a joined epoch: call join() first")
        _validate_manifest(manifest)
        target = torch.device(device)
        if group.backend == "nccl" and target.type != "cuda":
            raise ValueError(f"an NCCL group receives into CUDA memory, not {target}")
        deadline = _Deadline(timeout_s)
        epoch_store = _epoch_store(self._store, group.epoch)
        flats = [
            torch.empty(b.numel, dtype=dtype_from_name(b.dtype), device=target)
            for b in manifest.buckets
        ]

        def abort_reason() -> str | None:
            try:
                if epoch_store.check([_ABORTED_KEY]):
                    return epoch_store.get(_ABORTED_KEY).decode(errors="replace")
            except dist.DistError as e:
                return f"lost the learner's store: {e}"
            return None

        try:
            for bucket, flat in zip(manifest.buckets, flats, strict=True):
                if bucket.numel == 0:
                    continue
                group.broadcast(
                    flat,
                    deadline,
                    f"version {manifest.version} bucket {bucket.index}/{len(flats)}",
                    abort_reason,
                )
            actual = checksum_of_buckets(flats)
            failed = torch.tensor([int(actual != manifest.checksum)], dtype=torch.int32)
            failed = failed.to(target)
            group.allreduce_sum(failed, deadline, "checksum confirmation", abort_reason)
        except BroadcastFailed:
            self.leave()
            raise
        if actual != manifest.checksum:
            raise ChecksumMismatch(
                f"epoch {group.epoch}, rank {group.rank}: version {manifest.version} arrived with "
                f"sha256 {actual}, manifest says {manifest.checksum}"
            )
        return unpack_all(manifest, flats)

    def leave(self) -> None:
        """Drop the group of the current epoch (no-op without one); the store client stays."""
        group, self._group = self._group, None
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

"""Bucketed weight broadcast from the learner (rank 0) to every generator worker.

One code path for both backends: Gloo on CPU, NCCL on GPU (``resolve_backend``). Process groups
are stateless: each group epoch builds a fresh backend object over a ``PrefixStore`` of the
learner's ``TCPStore``, never the global default group, so membership can change between publishes
and a failed epoch is simply dropped.

Protocol, all keys under ``epoch/{e}/`` in the learner's store:

1. The learner calls ``WeightSender.open_epoch(e, world_size, join_timeout_s)``; every member
   (``WeightReceiver.join``) announces ``joined/{rank}`` and waits for ``members``.
2. When all ranks 1..world_size-1 have announced, the learner writes ``members`` (the world size)
   and everyone builds the group over ``epoch/{e}/pg/``. If some never announce, the learner writes
   ``aborted`` and raises ``MembersMissing`` (the waiting members see ``aborted`` and give up at
   once); the caller opens a new epoch without them.
3. Each publish: the manifest goes over gRPC (the control plane), then ``send``/``receive``
   broadcast every non-empty bucket from rank 0 and finish with one small all-reduce in which every
   member reports whether its sha256 over the received bytes matches the manifest. ``send`` returns
   only when every member has all the bytes and has checked them.
4. Any failure (a dead or stuck peer, the deadline) makes the epoch unusable: the learner writes
   ``aborted`` (members blocked in ``receive`` notice within ``ABORT_POLL_INTERVAL_S`` and fail
   too), drops the group, and the caller opens a new epoch with the survivors.

Every wait has a deadline: collectives get a per-operation timeout equal to the time left, and
completion is polled so a dead peer costs at most the deadline, never a hang. A group dropped with
an operation still in flight is released on a short-lived daemon thread, because the Gloo
destructor joins its worker threads, which only return when that operation times out.

Neither class is thread-safe; each is driven by one thread of its service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllreduceOptions, BroadcastOptions, ReduceOp, Work
from torch._C._distributed_c10d import Backend as _C10dBackend

from lpreg_core.weights import WeightManifest, checksum_of_buckets, dtype_from_name, unpack_all
from lpreg_core.weights import validate_manifest as _validate_manifest

if TYPE_CHECKING:
    from lpreg_core.config import BroadcastConfig

log = logging.getLogger(__name__)

GroupBackend = Literal["gloo", "nccl"]

# How often a member blocked in a collective asks the store whether the learner gave up the epoch;
# each check is one store round trip, so this trades store load against recovery latency.
ABORT_POLL_INTERVAL_S = 0.1
# Store polling while waiting for joins: short enough not to add visible latency to an epoch.
JOIN_POLL_INTERVAL_S = 0.02
# Completion polling backs off from the first to the second value: small buckets finish in well
# under a millisecond on loopback, large ones take tens of milliseconds.
_WORK_POLL_MIN_S = 0.0002
_WORK_POLL_MAX_S = 0.005
# Timeout of the learner's own store client (it only issues non-blocking set/check/delete).
_STORE_CLIENT_TIMEOUT_S = 30.0
# NCCL's watchdog kills the whole process on a collective error by default; a dead generator must
# cost the learner an epoch, not its life, so its groups are built with error handling off and
# aborted by this module instead.
_NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


class BroadcastError(RuntimeError):
    """Base class of the weight-broadcast errors."""


class MembersMissing(BroadcastError):
    """Some ranks did not join an epoch before the deadline; open a new epoch without them."""

    def __init__(self, epoch: int, missing_ranks: Sequence[int], join_timeout_s: float) -> None:
        self.epoch = epoch
        self.missing_ranks = tuple(sorted(missing_ranks))
        super().__init__(
            f"epoch {epoch}: ranks {list(self.missing_ranks)} did not join within "
            f"{join_timeout_s:.1f}s"
        )


class BroadcastFailed(BroadcastError):
    """A group could not be formed or a collective failed; the epoch is closed and unusable."""


class ChecksumMismatch(BroadcastError):
    """Received bytes differ from the manifest's checksum. The group itself is still usable."""


def resolve_backend(config_backend: str, device: torch.device) -> GroupBackend:
    """The collective backend for weights living on ``device``: auto = NCCL on CUDA, else Gloo."""
    device = torch.device(device)
    if config_backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if config_backend == "gloo":
        return "gloo"
    if config_backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"broadcast backend 'nccl' needs a CUDA device, got {device}")
        return "nccl"
    raise ValueError(f"unknown broadcast backend {config_backend!r} (expected auto, gloo or nccl)")


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def op_timeout(self) -> timedelta:
        # Collective backends reject a zero timeout; a millisecond expires just as surely.
        return timedelta(seconds=max(self.remaining_s(), 0.001))


def _epoch_store(store: dist.Store, epoch: int) -> dist.PrefixStore:
    return dist.PrefixStore(f"epoch/{epoch}", store)


def _joined_key(rank: int) -> str:
    return f"joined/{rank}"


_MEMBERS_KEY = "members"
_ABORTED_KEY = "aborted"


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host``: the one peers can reach us on.

    Connecting a UDP socket sends nothing; the kernel only chooses the route and source address.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])


@contextlib.contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _new_backend(
    store: dist.Store,
    rank: int,
    world_size: int,
    backend: GroupBackend,
    timeout_s: float,
    device: torch.device,
    device_host: str | None,
) -> _C10dBackend:
    """A process-group backend of its own, outside the global default group (blocks to connect)."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        options._devices = [
            dist.ProcessGroupGloo.create_device(hostname=device_host)
            if device_host
            else dist.ProcessGroupGloo.create_default_device()
        ]
        # One collective is in flight at a time, so one worker thread is enough.
        options._threads = 1
        return dist.ProcessGroupGloo(store, rank, world_size, options)
    if backend == "nccl":
        nccl_options = dist.ProcessGroupNCCL.Options()
        nccl_options._timeout = timeout
        with _env_var(_NCCL_ERROR_HANDLING_ENV, "0"):
            pg = dist.ProcessGroupNCCL(store, rank, world_size, nccl_options)
        cuda = (
            device
            if device.index is not None
            else torch.device("cuda", torch.cuda.current_device())
        )
        # Connect now, so a missing peer fails the epoch at open time, not at the first publish.
        pg.eager_connect_single_device(cuda)
        return pg
    raise ValueError(f"unknown broadcast backend {backend!r}")


def _drop_backend(holder: list[_C10dBackend]) -> None:
    holder.clear()


class _Group:
    """One epoch's process group: ordered broadcasts and all-reduces, each with a deadline."""

    def __init__(
        self,
        pg: _C10dBackend,
        epoch: int,
        rank: int,
        world_size: int,
        backend: GroupBackend,
        device: torch.device,
    ) -> None:
        self._holder = [pg]
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device
        self._last_work: Work | None = None

    @property
    def _pg(self) -> _C10dBackend:
        if not self._holder:
            raise BroadcastFailed(f"epoch {self.epoch}: the process group was already released")
        return self._holder[0]

    def broadcast(
        self,
        tensor: torch.Tensor,
        deadline: _Deadline,
        what: str,
        abort_reason: Callable[[], str | None] | None = None,
    ) -> None:
        options = BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.timeout = deadline.op_timeout()
        self._run(
            lambda: self._pg.broadcast([tensor], options),  # type: ignore[attr-defined]
            deadline,
            what,
            abort_reason,
        )

    def allreduce_sum(
        self,
        tensor: torch.Tensor,
        deadline: _Deadline,
        what: str,
        abort_reason: Callable[[], str | None] | None = None,
    ) -> None:
        options = AllreduceOptions()
        options.reduceOp = ReduceOp.SUM  # type: ignore[assignment]
        options.timeout = deadline.op_timeout()
        self._run(
            lambda: self._pg.allreduce([tensor], options),  # type: ignore[attr-defined]
            deadline,
            what,
            abort_reason,
        )

    def _run(
        self,
        start: Callable[[], Work],
        deadline: _Deadline,
        what: str,
        abort_reason: Callable[[], str | None] | None,
    ) -> None:
        context = f"epoch {self.epoch}, rank {self.rank}/{self.world_size}: {what}"
        if deadline.expired():
            raise BroadcastFailed(
                f"{context}: deadline of {deadline.timeout_s:.1f}s already passed"
            )
        try:
            work = start()
        except RuntimeError as e:
            raise BroadcastFailed(f"{context} could not start: {e}") from e
        self._last_work = work
        poll_s = _WORK_POLL_MIN_S
        next_abort_check = time.monotonic() + ABORT_POLL_INTERVAL_S
        while not work.is_completed():
            now = time.monotonic()
            if now >= deadline.end:
                raise BroadcastFailed(
                    f"{context} did not complete within the {deadline.timeout_s:.1f}s deadline "
                    "(a peer is dead or stuck)"
                )
            if abort_reason is not None and now >= next_abort_check:
                reason = abort_reason()
                if reason is not None:
                    raise BroadcastFailed(f"{context}: the learner abandoned the epoch ({reason})")
                next_abort_check = time.monotonic() + ABORT_POLL_INTERVAL_S
            time.sleep(min(poll_s, deadline.remaining_s()))
            poll_s = min(poll_s * 2, _WORK_POLL_MAX_S)
        try:
            # Surfaces the operation's error; on CUDA it also orders the caller's stream after it.
            work.wait()
        except RuntimeError as e:
            raise BroadcastFailed(f"{context} failed: {e}") from e

    def release(self) -> None:
        """Tear the group down. Never blocks on an operation that is still in flight."""
        if not self._holder:
            return
        pg = self._holder[0]
        in_flight = self._last_work is not None and not self._last_work.is_completed()
        self._last_work = None
        try:
            if in_flight:
                # NCCL: aborts the communicators so the operation fails now; Gloo: a no-op.
                pg.abort()
            else:
                pg.shutdown()
        except RuntimeError as e:
            log.warning("epoch %d: tearing down the %s group: %s", self.epoch, self.backend, e)
        del pg
        if in_flight:
            holder, self._holder = self._holder, []
            threading.Thread(
                target=_drop_backend,
                args=(holder,),
                name=f"lpreg-broadcast-release-epoch-{self.epoch}",
                daemon=True,
            ).start()
        else:
            self._holder.clear()


class WeightSender:
    """Learner side (rank 0): owns the TCPStore and the group of the current epoch.

    ``WeightSender(config.broadcast, device)`` binds the store on ``store_host:store_port``
    (port 0 picks a free one; see ``.port``). Per membership change: ``open_epoch``; per publish:
    ``send`` the flat buffers returned by ``lpreg_core.weights.build_manifest`` after the manifest
    went out over gRPC.
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

    def open_epoch(self, epoch: int, world_size: int, join_timeout_s: float) -> None:
        """Form the group of ``epoch`` with ranks 0..world_size-1, or raise.

        Waits until every member rank has announced itself, then builds the group. Raises
        ``MembersMissing`` if some never announce before the deadline, ``BroadcastFailed`` if the
        group cannot be connected (a member died after announcing). An open epoch is closed first.
        """
        store = self._require_store()
        if epoch <= self._last_epoch:
            raise ValueError(f"epochs must increase: {epoch} after {self._last_epoch}")
        if world_size < 2:
            raise ValueError(
                f"an epoch needs the learner and at least one member, got {world_size}"
            )
        deadline = _Deadline(join_timeout_s)
        self.close_epoch()
        self._last_epoch = epoch
        epoch_store = _epoch_store(store, epoch)
        pending = {rank: _joined_key(rank) for rank in range(1, world_size)}
        while True:
            pending = {r: k for r, k in pending.items() if not epoch_store.check([k])}
            if not pending:
                break
            if deadline.expired():
                missing = MembersMissing(epoch, list(pending), join_timeout_s)
                epoch_store.set(_ABORTED_KEY, str(missing))
                raise missing
            time.sleep(min(JOIN_POLL_INTERVAL_S, deadline.remaining_s()))
        epoch_store.set(_MEMBERS_KEY, str(world_size))
        try:
            pg = _new_backend(
                dist.PrefixStore("pg", epoch_store),
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
        self._group = _Group(pg, epoch, 0, world_size, self.backend, self.device)
        log.info("epoch %d open: %s group of %d", epoch, self.backend, world_size)

    def send(self, flats: Sequence[torch.Tensor], timeout_s: float) -> None:
        """Broadcast the flat buckets to every member and wait until all verified them.

        Raises ``BroadcastFailed`` (epoch closed: open a new one) when a peer dies or the deadline
        passes, ``ChecksumMismatch`` (epoch still open) when some member's bytes did not match.
        """
        group = self._group
        if group is None:
            raise RuntimeError("send() needs an open epoch: call open_epoch() first")
        deadline = _Deadline(timeout_s)
        for index, flat in enumerate(flats):
            if flat.dim() != 1 or not flat.is_contiguous():
                raise ValueError(f"bucket {index}: expected a flat contiguous tensor")
        try:
            for index, flat in enumerate(flats):
                if flat.numel() == 0:
                    continue
                group.broadcast(flat, deadline, f"broadcast of bucket {index}/{len(flats)}")
            failures = torch.zeros(1, dtype=torch.int32, device=_flat_device(flats, self.device))
            group.allreduce_sum(failures, deadline, "checksum confirmation")
        except BroadcastFailed as e:
            self._abort_epoch(str(e))
            raise
        num_failed = int(failures.item())
        if num_failed:
            raise ChecksumMismatch(
                f"epoch {group.epoch}: {num_failed} of {group.world_size - 1} members received "
                "bytes that do not match the manifest checksum"
            )

    def _abort_epoch(self, reason: str, *, failed: bool = True) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        if self._store is not None:
            try:
                _epoch_store(self._store, group.epoch).set(_ABORTED_KEY, reason)
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

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _flat_device(flats: Sequence[torch.Tensor], default: torch.device) -> torch.device:
    """Device of the buckets (the confirmation tensor must live where the collective runs)."""
    return flats[0].device if flats else default


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

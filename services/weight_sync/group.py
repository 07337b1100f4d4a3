"""Bucketed weight broadcast from the learner (rank 0) to every generator worker.

One code path for both backends: Gloo on CPU, NCCL on GPU (``resolve_backend``). Process groups
are stateless: each group epoch builds a fresh backend object over a sealed, prefixed view of the
learner's ``TCPStore`` (``rendezvous.SealedStore``), never the global default group, so membership can change between publishes
and a failed epoch is simply dropped.

Protocol, all keys under ``epoch/{e}/{tag}/`` in the learner's store, every value sealed under
the epoch's secret (``services.weight_sync.rendezvous``: the learner draws the secret per epoch and
hands it out only in the JoinGroup event; ``tag`` derives from it):

1. The learner draws the secret (``WeightSender.epoch_secret(e)``), sends each member its
   JoinGroup with it, and calls ``WeightSender.open_epoch(e, world_size, join_timeout_s)``; every
   member (``WeightReceiver.join``) announces ``joined/{rank}`` (sealed: it knows the secret and
   claims that rank of that world size; it also offers the bucket MACs it can check) and waits
   for ``members``.
2. When all ranks 1..world_size-1 have announced with a value that opens and matches their
   assignment, the learner writes ``members`` (the world size, and the epoch's bucket MAC:
   ``rendezvous.choose_mac`` of the offers) and everyone builds the group over
   ``pg/`` (Gloo's and NCCL's own rendezvous values are sealed as well). A forged announcement is
   ignored, so the rank stays missing. If some never announce, the learner writes ``aborted`` and
   raises ``MembersMissing`` (the waiting members see ``aborted`` and give up at once); the caller
   opens a new epoch without them. Members believe ``members`` and ``aborted`` only when sealed.
3. Each publish: the manifest goes over gRPC (the control plane), then ``send_weights`` (or
   ``send``) and ``receive_buckets`` broadcast every non-empty bucket from rank 0, in chunks of at
   most ``integrity.WIRE_CHUNK_BYTES``, then one broadcast of the buckets' MACs
   (``EpochKeys.bucket_mac``: keyed by the epoch secret, bound to the manifest's ``checksum``, the
   bucket index and size), and finish with one small all-reduce in which every member reports
   whether every bucket it received authenticates. ``send_weights`` fills each bucket from the
   weights iterator while the previous one is on the wire (at most two in flight), so the
   learner never holds the model twice; ``send`` returns only when every member has all the
   bytes and has checked them. A member loads one bucket while the next arrives and
   authenticates each on a worker thread as it lands, so its receive memory is bounded by two
   buckets; the sender sees no difference.
4. Any failure (a dead or stuck peer, the deadline) makes the epoch unusable: the learner writes
   ``aborted`` (members blocked in a receive notice within ``ABORT_POLL_INTERVAL_S`` and fail
   too), drops the group, and the caller opens a new epoch with the survivors.

Every wait has a deadline: collectives get a per-operation timeout equal to the time left, and
completion is polled so a dead peer costs at most the deadline, never a hang. A group dropped with
an operation still in flight is released on a short-lived daemon thread, because the Gloo
destructor joins its worker threads, which only return when that operation times out.

Neither class is thread-safe; each is driven by one thread of its service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllreduceOptions, BroadcastOptions, ReduceOp, Work
from torch._C._distributed_c10d import Backend as _C10dBackend

from services.weight_sync.rendezvous import HMAC_SHA256, MAC_ALGORITHMS

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
    """Received bytes do not authenticate for the manifest (altered on the way, or the member was
    given another manifest). The group itself is still usable."""


def resolve_backend(
    config_backend: str, device: torch.device | str, *, device_field: str = "learner.device"
) -> GroupBackend:
    """The collective backend for weights living on ``device``: auto = NCCL on CUDA, else Gloo.

    ``device_field`` names the setting that put the weights on ``device``, so that a refusal
    says which two settings disagree.
    """
    device = torch.device(device)
    if config_backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if config_backend == "gloo":
        return "gloo"
    if config_backend == "nccl":
        if device.type != "cuda":
            raise ValueError(
                f"broadcast.backend=nccl needs CUDA memory on both sides, but {device_field} is "
                f"{device.type}; set broadcast.backend=gloo (or auto), or run it on a GPU"
            )
        return "nccl"
    raise ValueError(
        f"broadcast.backend={config_backend!r} is not a backend (expected auto, gloo or nccl)"
    )


def check_member_backend(
    config_backend: str, learner_device: str, device: torch.device | str
) -> str:
    """Start-up check of a generator whose workers hold their weights on ``device``.

    Refuses (``ValueError`` naming the settings) a CPU generator facing NCCL, whether
    ``broadcast.backend`` says nccl or says auto for a learner configured onto a GPU
    (``learner.device=cuda``). Returns the backend the learner will pick: "gloo", "nccl", or
    "auto" when only the learner's machine can tell (``learner.device=auto``).
    """
    member = torch.device(device)
    where = f"the generator's device ({member.type})"
    if config_backend == "auto" and learner_device == "cuda":
        if member.type != "cuda":
            raise ValueError(
                "broadcast.backend=auto with learner.device=cuda broadcasts over NCCL, which "
                f"needs CUDA memory on both sides, but {where} is not a GPU; set "
                "broadcast.backend=gloo, or run the generator on a GPU"
            )
        return "nccl"
    if config_backend == "auto" and learner_device == "auto":
        return "auto"
    if config_backend == "auto":
        return "gloo"
    return resolve_backend(config_backend, member, device_field=where)


def check_receive_target(backend: str, device: torch.device | str) -> torch.device:
    """Where a member of a ``backend`` group can receive: NCCL only into CUDA memory."""
    target = torch.device(device)
    if backend == "nccl" and target.type != "cuda":
        raise ValueError(
            f"an NCCL broadcast group receives into CUDA memory, not {target}: "
            "set broadcast.backend=gloo for a generator without a GPU"
        )
    return target


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


def _joined_key(rank: int) -> str:
    return f"joined/{rank}"


def _joined_claim(
    epoch: int, rank: int, world_size: int, member: str, macs: Sequence[str] = MAC_ALGORITHMS
) -> bytes:
    """A member's announcement: the rank assignment it received in its JoinGroup, who it is, and
    the bucket MACs it can check."""
    claim = {
        "epoch": epoch,
        "rank": rank,
        "world_size": world_size,
        "member": member,
        "macs": list(macs),
    }
    return json.dumps(claim, sort_keys=True).encode()


def _claim_macs(claim: bytes) -> list[str]:
    """The bucket MACs a (matching) claim offers."""
    macs = json.loads(claim).get("macs", [])
    return [str(m) for m in macs] if isinstance(macs, list) else []


def _epoch_start(world_size: int, mac: str) -> str:
    """The learner's ``members`` value: the epoch's world size and bucket MAC."""
    return json.dumps({"world_size": world_size, "mac": mac})


def _read_epoch_start(value: bytes) -> tuple[int, str]:
    fields = json.loads(value)
    return int(fields["world_size"]), str(fields["mac"])


def _claim_member(claim: bytes, epoch: int, rank: int, world_size: int) -> str | None:
    """Who announced ``rank`` if the (opened) claim matches the learner's assignment, else None."""
    try:
        fields = json.loads(claim)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    if (fields.get("epoch"), fields.get("rank"), fields.get("world_size")) != (
        epoch,
        rank,
        world_size,
    ):
        return None
    return str(fields.get("member", "?"))


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
        mac: str = HMAC_SHA256,
    ) -> None:
        self._holder = [pg]
        self.mac = mac  # the epoch's bucket MAC algorithm
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
        self.wait(self.start_broadcast(tensor, deadline, what), deadline, what, abort_reason)

    def start_broadcast(self, tensor: torch.Tensor, deadline: _Deadline, what: str) -> Work:
        """Queue a broadcast from rank 0 without waiting for it: ``wait`` on the result.

        Operations run in the order they are started, so a caller may keep the network busy with
        the next broadcast while it works on the data of the previous one.
        """
        options = BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.timeout = deadline.op_timeout()
        return self._start(
            lambda: self._pg.broadcast([tensor], options),  # type: ignore[attr-defined]
            deadline,
            what,
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
        work = self._start(
            lambda: self._pg.allreduce([tensor], options),  # type: ignore[attr-defined]
            deadline,
            what,
        )
        self.wait(work, deadline, what, abort_reason)

    def _context(self, what: str) -> str:
        return f"epoch {self.epoch}, rank {self.rank}/{self.world_size}: {what}"

    def _start(self, start: Callable[[], Work], deadline: _Deadline, what: str) -> Work:
        context = self._context(what)
        if deadline.expired():
            raise BroadcastFailed(
                f"{context}: deadline of {deadline.timeout_s:.1f}s already passed"
            )
        try:
            work = start()
        except RuntimeError as e:
            raise BroadcastFailed(f"{context} could not start: {e}") from e
        # Operations complete in order: the last one started tells whether any is in flight.
        self._last_work = work
        return work

    def wait(
        self,
        work: Work,
        deadline: _Deadline,
        what: str,
        abort_reason: Callable[[], str | None] | None = None,
    ) -> None:
        """Wait (bounded by ``deadline``, polling ``abort_reason``) for an operation started here."""
        context = self._context(what)
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

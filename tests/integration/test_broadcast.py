"""The weight broadcast over real Gloo groups: the learner side runs in the test process (it owns
the TCPStore), every member is a separate worker process (tests/integration/_broadcast_worker.py)
driven over stdin/stdout. Failures are real: members are SIGKILLed or SIGSTOPped by PID."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lpreg_core.config import BroadcastConfig
from lpreg_core.weight_sync import layout_of, plan_manifest
from lpreg_core.weights import WeightManifest, build_manifest, manifest_to_proto
from services.weight_sync import (
    BroadcastFailed,
    ChecksumMismatch,
    MembersMissing,
    WeightReceiver,
    WeightSender,
)
from services.weight_sync.group import _Group
from services.weight_sync.rendezvous import HMAC_SHA256, MAC_ALGORITHMS

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_broadcast_worker.py")
WORKER_START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
WORKER_EXIT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
# Several buckets per publish: 64 KiB buckets over ~1 MB of mixed-dtype weights.
BUCKET_BYTES = 64 * 1024


class Worker:
    """One member process; commands go to stdin, JSON replies are read from stdout."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def command(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"worker {self.proc.pid} did not answer{self._log_tail()}"
            ) from None
        if reply is None:
            raise AssertionError(
                f"worker {self.proc.pid} exited with {self.proc.wait()}{self._log_tail()}"
            )
        return reply

    def ok(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        reply = self.reply(timeout_s)
        assert reply["ok"], f"worker {self.proc.pid}: {reply}{self._log_tail()}"
        return reply

    def _log_tail(self) -> str:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return "\nworker stderr:\n" + "\n".join(tail) if tail else ""

    def join(
        self,
        epoch: int,
        rank: int,
        world_size: int,
        port: int,
        secret: bytes,
        timeout_s: float = JOIN_TIMEOUT_S,
    ) -> None:
        self.command(
            op="join",
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            port=port,
            timeout_s=timeout_s,
            secret=secret.hex(),
        )

    def receive(self, manifest: WeightManifest, **extra: Any) -> None:
        self.command(
            op="receive",
            manifest=manifest_to_proto(manifest).SerializeToString().hex(),
            timeout_s=SEND_TIMEOUT_S,
            **extra,
        )

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def request_exit(self) -> None:
        if self.proc.poll() is None:
            # A SIGSTOPped worker could not read its exit command.
            os.kill(self.proc.pid, signal.SIGCONT)
            with contextlib.suppress(OSError):
                self.command(op="exit")

    def stop(self) -> None:
        self.request_exit()
        try:
            self.proc.wait(timeout=WORKER_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def worker_pool(tmp_path: Path) -> Iterator[Callable[[int], list[Worker]]]:
    """``spawn(n)`` starts n member processes (in parallel) and waits until they are ready; all
    are stopped on exit."""
    workers: list[Worker] = []

    def spawn(n: int) -> list[Worker]:
        new = [Worker(tmp_path / f"worker-{len(workers) + i}.log") for i in range(n)]
        workers.extend(new)
        for w in new:
            w.ok(WORKER_START_TIMEOUT_S)
        return new

    try:
        yield spawn
    finally:
        for w in workers:
            w.request_exit()
        for w in workers:
            w.stop()


def make_sender() -> WeightSender:
    config = BroadcastConfig.model_validate(
        {"store_host": "127.0.0.1", "store_port": 0, "bucket_bytes": BUCKET_BYTES}
    )
    return WeightSender(config, "cpu")


@pytest.fixture
def spawn_workers(tmp_path: Path) -> Iterator[Callable[[int], list[Worker]]]:
    with worker_pool(tmp_path) as spawn:
        yield spawn


@pytest.fixture
def sender() -> Iterator[WeightSender]:
    with make_sender() as s:
        yield s


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    """~1 MB of weights in three dtypes, including one tensor larger than a bucket."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(96, 256, generator=g),  # 96 KiB: its own bucket
        "layers.0.attn.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "layers.0.attn.bias": torch.randn(64, generator=g).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(128, 64, generator=g),
        "layers.0.mlp.bias": torch.randn(128, generator=g),
        "layers.1.mlp.weight": torch.randn(128, 64, generator=g).to(torch.float16),
        "layers.1.attn.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "layers.1.mlp.bias": torch.randn(128, generator=g),
        "lm_head.weight": torch.randn(200, 64, generator=g),
        "step": torch.tensor([seed], dtype=torch.int64),
    }


def expected_digests(weights: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()

    return {
        name: [digest(t), list(t.shape), str(t.dtype).removeprefix("torch.")]
        for name, t in weights.items()
    }


def open_epoch(sender: WeightSender, epoch: int, members: list[Worker]) -> None:
    """Members join as ranks 1..n while the learner forms the epoch."""
    world_size = len(members) + 1
    secret = sender.epoch_secret(epoch)
    for rank, worker in enumerate(members, start=1):
        worker.join(epoch, rank, world_size, sender.port, secret)
    sender.open_epoch(epoch, world_size, JOIN_TIMEOUT_S)
    for worker in members:
        worker.ok()


def publish(sender: WeightSender, version: int, members: list[Worker]) -> None:
    """One full publish as the learner makes it (planned from the layout, buckets filled from
    the weights as they go out); every member must hold bit-identical tensors and the same
    checksum."""
    weights = make_weights(seed=version)
    manifest = plan_manifest(version, layout_of(weights.items()), BUCKET_BYTES)
    assert len(manifest.buckets) >= 4
    for worker in members:
        worker.receive(manifest)
    sender.send_weights(manifest, iter(weights.items()), SEND_TIMEOUT_S)
    want = expected_digests(weights)
    for worker in members:
        got = worker.ok()
        assert got["version"] == version
        assert got["checksum"] == manifest.checksum
        assert got["tensors"] == want


@pytest.mark.timeout(120)
def test_two_members_receive_bit_identical_weights_over_several_buckets_and_versions(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    members = spawn_workers(2)
    open_epoch(sender, 1, members)
    assert (sender.epoch, sender.world_size) == (1, 3)
    publish(sender, version=1, members=members)
    publish(sender, version=2, members=members)


@pytest.mark.timeout(120)
def test_the_learner_gathers_each_bucket_only_while_the_one_before_is_on_the_wire(
    sender: WeightSender,
    spawn_workers: Callable[[int], list[Worker]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never a full copy of the weights on the learner: bucket k is filled from tensors gathered
    one at a time (fresh ones, as a sharded learner gathers them) only up to its last tensor,
    and only once bucket k - 2 has left."""
    (member,) = spawn_workers(1)
    open_epoch(sender, 1, [member])
    weights = {f"layers.{i}.weight": torch.randn(64, 64) for i in range(12)}  # 16 KiB each
    manifest = plan_manifest(1, layout_of(weights.items()), 2 * 16 * 1024)
    assert len(manifest.buckets) == 6
    produced: list[str] = []
    gathered_when_sent: list[int] = []
    sent_when_gathered: list[int] = []
    start_broadcast, wait = _Group.start_broadcast, _Group.wait
    waited: list[object] = []

    def spy_start(group: _Group, tensor: torch.Tensor, *args: Any) -> Any:
        gathered_when_sent.append(len(produced))
        return start_broadcast(group, tensor, *args)

    def spy_wait(group: _Group, work: Any, *args: Any) -> None:
        wait(group, work, *args)
        waited.append(work)

    monkeypatch.setattr(_Group, "start_broadcast", spy_start)
    monkeypatch.setattr(_Group, "wait", spy_wait)
    # Every bucket buffer the learner allocates, alive until its memory is freed.
    buffers = {"live": 0, "peak": 0, "allocated": 0}
    take_buffer = WeightSender._take_buffer

    def freed() -> None:
        buffers["live"] -= 1

    def spy_take(self: WeightSender, bucket: Any, device: torch.device) -> torch.Tensor:
        flat = take_buffer(self, bucket, device)
        storage = flat.untyped_storage()
        if storage.data_ptr() not in seen_storages:
            seen_storages.add(storage.data_ptr())
            buffers["allocated"] += 1
            buffers["live"] += 1
            buffers["peak"] = max(buffers["peak"], buffers["live"])
            weakref.finalize(storage, freed)
        return flat

    seen_storages: set[int] = set()
    monkeypatch.setattr(WeightSender, "_take_buffer", spy_take)

    def gather() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights.items():
            produced.append(name)
            sent_when_gathered.append(len(waited))
            yield name, tensor.clone()

    member.receive(manifest)
    sender.send_weights(manifest, gather(), SEND_TIMEOUT_S)
    assert member.ok()["tensors"] == expected_digests(weights)
    # One broadcast per bucket (they are smaller than a wire chunk), each started as soon as its
    # second tensor was gathered; the MACs follow the last.
    assert gathered_when_sent == [2, 4, 6, 8, 10, 12, 12]
    # Two bucket buffers, reused bucket after bucket, never one per bucket.
    assert buffers["allocated"] == buffers["peak"] == 2, buffers
    # Every member offered every MAC this installation has: the epoch uses the fastest.
    assert sender._group is not None and sender._group.mac == MAC_ALGORITHMS[0]
    # Bucket k (tensors 2k, 2k + 1) is gathered only after bucket k - 2 was sent.
    assert all(sent >= i // 2 - 1 for i, sent in enumerate(sent_when_gathered))
    assert sent_when_gathered[4] >= 1 and sent_when_gathered[-1] >= 4


@pytest.mark.timeout(120)
def test_a_joining_member_starts_a_new_epoch_with_a_larger_world(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    members = spawn_workers(3)
    open_epoch(sender, 1, members[:2])
    publish(sender, version=1, members=members[:2])

    open_epoch(sender, 2, members)
    assert (sender.epoch, sender.world_size) == (2, 4)
    publish(sender, version=2, members=members)


@pytest.mark.timeout(120)
def test_a_checksum_mismatch_is_reported_on_both_sides_and_the_epoch_stays_usable(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    (member,) = spawn_workers(1)
    open_epoch(sender, 1, [member])
    manifest, flats = build_manifest(1, make_weights(seed=1), BUCKET_BYTES)
    member.receive(dataclasses.replace(manifest, checksum="0" * 64))
    with pytest.raises(ChecksumMismatch):
        sender.send(flats, SEND_TIMEOUT_S)
    assert member.reply()["error"] == "ChecksumMismatch"
    assert sender.epoch == 1
    publish(sender, version=2, members=[member])


@pytest.mark.timeout(60)
def test_a_member_without_blake3_gets_an_epoch_authenticated_with_hmac_sha256(
    sender: WeightSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch's bucket MAC is one every member can check: a member that offers only
    HMAC-SHA256 (no blake3 installed) is not locked out, and its bytes are still verified."""
    import services.weight_sync.receiver as receiver_module

    offer_hmac_only = functools.partial(receiver_module._joined_claim, macs=[HMAC_SHA256])
    monkeypatch.setattr(receiver_module, "_joined_claim", offer_hmac_only)
    weights = make_weights(seed=3)
    manifest = plan_manifest(3, layout_of(weights.items()), BUCKET_BYTES)
    with WeightReceiver() as receiver, concurrent.futures.ThreadPoolExecutor(1) as pool:
        secret = sender.epoch_secret(1)
        joining = pool.submit(
            receiver.join, 1, 1, 2, "127.0.0.1", sender.port, "gloo", JOIN_TIMEOUT_S, secret=secret
        )
        sender.open_epoch(1, 2, JOIN_TIMEOUT_S)
        joining.result(timeout=JOIN_TIMEOUT_S)

        def receive() -> dict[str, torch.Tensor]:
            with receiver.receive_buckets(manifest, "cpu", SEND_TIMEOUT_S) as stream:
                return {name: tensor.clone() for name, tensor in stream}

        receiving = pool.submit(receive)
        sender.send_weights(manifest, weights.items(), SEND_TIMEOUT_S)
        received = receiving.result(timeout=SEND_TIMEOUT_S)
        assert sender._group is not None and sender._group.mac == HMAC_SHA256
        assert expected_digests(received) == expected_digests(weights)

        forged = dataclasses.replace(manifest, checksum="0" * 64)
        receiving = pool.submit(lambda: receiver.receive_buckets(forged, "cpu", SEND_TIMEOUT_S))
        stream = receiving.result(timeout=SEND_TIMEOUT_S)
        draining = pool.submit(stream.close)
        with pytest.raises(ChecksumMismatch):
            sender.send_weights(manifest, weights.items(), SEND_TIMEOUT_S)
        draining.result(timeout=SEND_TIMEOUT_S)
        assert isinstance(stream.error, ChecksumMismatch)


@pytest.mark.timeout(30)
def test_join_fails_within_its_deadline_when_the_store_is_unreachable(
    free_port: Callable[[], int],
) -> None:
    with WeightReceiver() as receiver, pytest.raises(BroadcastFailed, match="cannot reach"):
        receiver.join(1, 1, 2, "127.0.0.1", free_port(), "gloo", timeout_s=1.0, secret=bytes(32))


@pytest.mark.timeout(120)
def test_a_member_that_never_joins_is_reported_missing_and_the_rest_carry_on(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    (present,) = spawn_workers(1)
    present.join(1, 1, 3, sender.port, sender.epoch_secret(1))
    join_timeout_s = 2.0
    with pytest.raises(MembersMissing) as missing:
        sender.open_epoch(1, 3, join_timeout_s)
    assert missing.value.missing_ranks == (2,)
    assert sender.epoch is None
    # The member that did join learns that the epoch was abandoned instead of waiting it out.
    reply = present.reply()
    assert reply["error"] == "BroadcastFailed" and "abandoned" in reply["message"]

    open_epoch(sender, 2, [present])
    publish(sender, version=1, members=[present])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["before_receiving", "while_receiving"])
def test_a_killed_member_fails_the_send_and_the_survivors_form_a_new_epoch(
    when: str, sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    survivor, victim = spawn_workers(2)
    open_epoch(sender, 1, [survivor, victim])
    publish(sender, version=1, members=[survivor, victim])

    manifest, flats = build_manifest(2, make_weights(seed=2), BUCKET_BYTES)
    if when == "before_receiving":
        victim.signal(signal.SIGKILL)
        victim.proc.wait()
    else:
        victim.receive(manifest, die_after_buckets=2)
    survivor.receive(manifest)
    with pytest.raises(BroadcastFailed):
        sender.send(flats, SEND_TIMEOUT_S)
    assert sender.epoch is None
    assert victim.proc.wait(timeout=REPLY_TIMEOUT_S) == -signal.SIGKILL
    reply = survivor.reply()
    assert reply["error"] == "BroadcastFailed", reply

    open_epoch(sender, 2, [survivor])
    publish(sender, version=3, members=[survivor])


@pytest.mark.timeout(120)
def test_a_stuck_member_fails_the_send_at_the_deadline(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    survivor, stuck = spawn_workers(2)
    open_epoch(sender, 1, [survivor, stuck])
    manifest, flats = build_manifest(1, make_weights(seed=1), BUCKET_BYTES)
    survivor.receive(manifest)
    stuck.signal(signal.SIGSTOP)
    try:
        with pytest.raises(BroadcastFailed):
            sender.send(flats, timeout_s=2.0)
    finally:
        stuck.signal(signal.SIGCONT)
    assert survivor.reply()["error"] == "BroadcastFailed"
    stuck.signal(signal.SIGKILL)
    stuck.proc.wait()

    open_epoch(sender, 2, [survivor])
    publish(sender, version=2, members=[survivor])


def _own_resources() -> tuple[int, int]:
    # Groups dropped mid-operation by earlier tests are released on daemon threads that end when
    # Gloo times the operation out; wait for them so they are not counted.
    for thread in threading.enumerate():
        if thread.name.startswith("lpreg-broadcast-release"):
            thread.join(SEND_TIMEOUT_S)
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


@pytest.mark.timeout(120)
def test_many_epochs_in_one_process_leak_no_threads_or_sockets(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    (member,) = spawn_workers(1)
    # The first epoch creates Gloo's process-wide state; measure from the second on.
    open_epoch(sender, 1, [member])
    publish(sender, version=1, members=[member])
    sender.close_epoch()
    member.command(op="leave")
    member.ok()
    member.command(op="resources")
    member_before = member.ok()
    before = _own_resources()

    for epoch in range(2, 8):
        open_epoch(sender, epoch, [member])
        publish(sender, version=epoch, members=[member])
        sender.close_epoch()
        member.command(op="leave")
        member.ok()

    assert _own_resources() == before
    member.command(op="resources")
    member_after = member.ok()
    for key in ("fds", "threads", "os_threads"):
        assert member_after[key] == member_before[key], (key, member_before, member_after)

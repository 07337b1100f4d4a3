"""The weight-sync rendezvous admits only processes holding the epoch's secret.

The outsider has what any process on the network has: the learner's store address and port, the
epoch number and world size (guessable), and every key and value in the store (``list_keys``,
``get``). It runs in its own process (tests/integration/_broadcast_worker.py's ``raw``,
``join`` with a guessed secret, ``intrude``); the learner side runs in the test process, the
members are separate processes as in test_broadcast.py.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_broadcast import (
    BUCKET_BYTES,
    SEND_TIMEOUT_S,
    Worker,
    make_sender,
    make_weights,
    open_epoch,
    publish,
    worker_pool,
)

from lpreg_core.weights import build_manifest
from services.weight_sync import BroadcastFailed, MembersMissing, WeightReceiver, WeightSender
from services.weight_sync.rendezvous import EpochKeys, SealedStore, SealError

pytestmark = pytest.mark.integration

# Short, so the rounds the outsider makes fail do not drag the test out.
SHORT_JOIN_TIMEOUT_S = 3.0


@pytest.fixture
def spawn_workers(tmp_path: Path) -> Iterator[Callable[[int], list[Worker]]]:
    with worker_pool(tmp_path) as spawn:
        yield spawn


@pytest.fixture
def sender() -> Iterator[WeightSender]:
    with make_sender() as s:
        yield s


def raw(outsider: Worker, port: int, *actions: list[str]) -> list[Any]:
    outsider.command(op="raw", port=port, actions=list(actions))
    results: list[Any] = outsider.ok()["results"]
    return results


def live_prefix(outsider: Worker, port: int, epoch: int) -> str:
    """The prefix of ``epoch``'s keys, as anyone can read it off the store once a member joined."""
    (keys,) = raw(outsider, port, ["list"])
    joined = [k for k in keys if k.startswith(f"epoch/{epoch}/") and "/joined/" in k]
    assert joined, keys
    return str(joined[0].split("/joined/", 1)[0])


@pytest.mark.timeout(180)
def test_an_outsider_cannot_take_the_rank_of_a_stopped_member(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    good, stopped, claimant, forger = spawn_workers(4)
    open_epoch(sender, 1, [good, stopped])
    publish(sender, version=1, members=[good, stopped])
    # Still registered with the control plane, but not running: rank 2 is free for the taking.
    stopped.signal(signal.SIGSTOP)

    secret = sender.epoch_secret(2)
    good.join(2, 1, 3, sender.port, secret)
    # The outsider replays the good member's announcement as rank 2's, writes rank 2's key where
    # the store used to keep it, and joins as rank 2 with a secret of its own.
    prefix = None
    while prefix is None:
        (keys,) = raw(forger, sender.port, ["list"])
        prefix = next(
            (
                k.removesuffix("/joined/1")
                for k in keys
                if k.startswith("epoch/2/") and k.endswith("/joined/1")
            ),
            None,
        )
    raw(
        forger,
        sender.port,
        ["copy", f"{prefix}/joined/1", f"{prefix}/joined/2"],
        ["set", "epoch/2/joined/2", "outsider:1"],
    )
    claimant.join(2, 2, 3, sender.port, secrets.token_bytes(32), timeout_s=SHORT_JOIN_TIMEOUT_S)

    with pytest.raises(MembersMissing) as missing:
        sender.open_epoch(2, 3, SHORT_JOIN_TIMEOUT_S)
    assert missing.value.missing_ranks == (2,)
    reply = good.reply()
    assert reply["error"] == "BroadcastFailed" and "abandoned" in reply["message"], reply
    # The claimant never saw the epoch: its keys live under a prefix nobody reads.
    reply = claimant.reply()
    assert reply["error"] == "BroadcastFailed" and "did not start" in reply["message"], reply

    open_epoch(sender, 3, [good])
    publish(sender, version=2, members=[good])


@pytest.mark.timeout(180)
def test_an_outsider_in_the_gloo_rendezvous_receives_nothing(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    good, intruder = spawn_workers(2)
    manifest, flats = build_manifest(1, make_weights(seed=1), BUCKET_BYTES)
    # The intruder watches the store, and as soon as the member published its Gloo address it
    # builds a Gloo group as that rank over the same keys (overwriting the address).
    intruder.command(
        op="intrude",
        port=sender.port,
        epoch=1,
        rank=1,
        world_size=2,
        timeout_s=SHORT_JOIN_TIMEOUT_S,
    )
    good.join(1, 1, 2, sender.port, sender.epoch_secret(1))
    try:
        sender.open_epoch(1, 2, SHORT_JOIN_TIMEOUT_S)
        opened = True
    except BroadcastFailed:
        opened = False  # the learner read the intruder's address: it does not open
    joined = good.reply()
    if joined["ok"]:
        assert opened, joined
        good.receive(manifest)
        sender.send(flats, SEND_TIMEOUT_S)
        assert good.ok()["checksum"] == manifest.checksum
    else:
        # Whoever read the intruder's unsealed address refused it; the epoch is lost, for the
        # member too (it may read the overwrite after the learner read its own address).
        assert joined["error"] == "BroadcastFailed", joined
        assert not opened or "not sealed" in joined["message"], joined
    reply = intruder.reply()
    assert not reply["ok"], reply
    assert reply["prefix"].startswith("epoch/1/")

    open_epoch(sender, 2, [good])
    publish(sender, version=2, members=[good])


@pytest.mark.timeout(180)
def test_aborted_keys_written_without_the_secret_change_nothing(
    sender: WeightSender, spawn_workers: Callable[[int], list[Worker]]
) -> None:
    good, forger = spawn_workers(2)
    # The attack that used to stop training for good: `aborted` for every future epoch.
    raw(forger, sender.port, *[["set", f"epoch/{e}/aborted", "forged"] for e in range(1, 6)])
    open_epoch(sender, 1, [good])
    publish(sender, version=1, members=[good])

    # Under the live epoch's own prefix, read off the store: the members do not believe it.
    prefix = live_prefix(forger, sender.port, 1)
    raw(forger, sender.port, ["set", f"{prefix}/aborted", "forged"])
    publish(sender, version=2, members=[good])

    open_epoch(sender, 2, [good])
    publish(sender, version=3, members=[good])
    # Keys outside the live epochs were swept when epoch 2 opened: the outsider's included.
    (keys,) = raw(forger, sender.port, ["list"])
    assert keys and all(k.startswith((prefix + "/", "epoch/2/")) for k in keys), keys


@pytest.fixture
def store() -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)
    )


def test_a_sealed_value_opens_only_under_its_secret_and_its_key(store: dist.TCPStore) -> None:
    keys = EpochKeys(secrets.token_bytes(32), 7)
    sealed = SealedStore.for_epoch(store, keys)
    sealed.set("joined/1", b'{"rank": 1}')
    assert sealed.get("joined/1") == b'{"rank": 1}'
    raw_value = store.get(f"{keys.prefix}/joined/1")
    assert b"rank" not in raw_value  # encrypted, not only signed

    # Moved to another rank's key, signed under another secret, or altered: it does not open.
    store.set(f"{keys.prefix}/joined/2", raw_value)  # type: ignore[arg-type]
    assert sealed.read_sealed("joined/2") is None
    with pytest.raises(SealError):
        sealed.get("joined/2")
    other = SealedStore.for_epoch(store, EpochKeys(secrets.token_bytes(32), 7))
    assert other.keys.prefix != keys.prefix
    store.set(f"{other.keys.prefix}/joined/1", raw_value)  # type: ignore[arg-type]
    assert other.read_sealed("joined/1") is None
    flipped = bytearray(raw_value)
    flipped[20] ^= 1
    store.set(f"{keys.prefix}/joined/1", bytes(flipped))  # type: ignore[arg-type]
    assert sealed.read_sealed("joined/1") is None
    # A child store (the process group's keys) binds its scope too.
    sealed.child("pg").set("0/1", b"address")
    assert sealed.child("pg").get("0/1") == b"address"
    store.set(f"{keys.prefix}/0/1", store.get(f"{keys.prefix}/pg/0/1"))  # type: ignore[arg-type]
    assert sealed.read_sealed("0/1") is None


def test_each_epoch_draws_a_fresh_secret_and_cannot_open_without_one(
    sender: WeightSender,
) -> None:
    first, second = sender.epoch_secret(1), sender.epoch_secret(2)
    assert first == sender.epoch_secret(1) and len(first) == 32 and first != second
    with pytest.raises(ValueError, match="no secret"):
        sender.open_epoch(3, 2, SHORT_JOIN_TIMEOUT_S)


def test_a_member_without_the_secret_is_refused_before_it_contacts_anyone() -> None:
    # Port 9 (discard) is never dialled: the refusal comes first.
    with WeightReceiver() as receiver, pytest.raises(ValueError, match="secret"):
        receiver.join(1, 1, 2, "127.0.0.1", 9, "gloo", timeout_s=1.0)
    with WeightReceiver() as receiver, pytest.raises(ValueError, match="secret"):
        receiver.join(1, 1, 2, "127.0.0.1", 9, "gloo", timeout_s=1.0, secret=b"short")


def test_sealing_keeps_every_bit_of_a_value() -> None:
    keys = EpochKeys(secrets.token_bytes(32), 1)
    for value in (b"", bytes(range(256)) * 3, torch.randn(40).numpy().tobytes()):
        assert keys.open("k", keys.seal("k", value)) == value

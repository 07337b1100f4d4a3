"""The authenticated rendezvous of a group epoch: a per-epoch secret seals every store value.

The learner's TCPStore is a plain socket: anyone who reaches it can list, read, write and delete
any key (c10d has no authentication, and ``list_keys`` shows every key name). So a key's name
proves nothing and a value may be read by anyone. What the rendezvous trusts instead is the epoch
secret, fresh random bytes the learner draws per epoch and hands out only in the JoinGroup event
of the gRPC control stream (itself behind the bearer token):

- every key of an epoch lives under ``epoch/{e}/{tag}``, ``tag`` an HMAC of the epoch under the
  secret, so keys written before the epoch opened (an ``aborted`` planted for a future epoch, a
  ``joined/{rank}`` written in advance) are never read: nobody can name the prefix in advance;
- every value, ours and the ones Gloo or NCCL write for their own rendezvous (peer addresses, the
  NCCL unique id), is encrypted and authenticated under the secret and bound to its key name
  (``SealedStore``). A member's ``joined/{rank}`` therefore proves it knows the secret and claims
  exactly that rank (a sealed value copied to another key does not open); the learner's
  ``members`` and ``aborted`` prove they come from the learner; and a peer address cannot be read
  (to dial a listener) or replaced (to be dialled instead of a member) without the secret.

A value that does not open is ignored where the protocol polls for it (``read_sealed``) and fails
the rendezvous where Gloo or NCCL read it (the epoch is lost, not the learner). What the store
cannot prevent: anyone who reaches it can still delete or overwrite keys of the open epoch (a
denial of that epoch) and store data (memory; ``WeightSender`` sweeps keys outside the current
and previous epoch at each epoch). The weights themselves travel over the collective's own
connections, unencrypted (keep the broadcast network private) but authenticated: every bucket
carries a MAC under a key derived from the secret (``EpochKeys.bucket_mac``), so bytes altered or
injected on the way are detected and reported, never taken for the published version.
"""

from __future__ import annotations

import hmac
import importlib
import secrets
import struct
from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import ModuleType
from typing import Protocol

import torch.distributed as dist


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the installation
        return None


# BLAKE3's keyed mode: a MAC several times faster than HMAC-SHA256 on one core, where installed.
_blake3 = _optional("blake3")
HMAC_SHA256 = "hmac-sha256"
BLAKE3 = "blake3"
MAC_ALGORITHMS: tuple[str, ...] = (BLAKE3, HMAC_SHA256) if _blake3 is not None else (HMAC_SHA256,)
"""The bucket MACs this process can compute, preferred first; HMAC-SHA256 everywhere."""

# 256 random bits per epoch; a secret shorter than 128 bits is refused.
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
_LABEL = b"lpreg/weight-sync/v1"
_NONCE_BYTES = 16
_TAG_BYTES = 32
# Hex digits of the prefix tag: 128 bits, not guessable in advance.
_PREFIX_TAG_CHARS = 32


class BucketMac(Protocol):
    """A MAC being computed: feed it bytes, then take the tag."""

    def update(self, data: memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def choose_mac(offers: Iterable[Sequence[str]]) -> str:
    """The epoch's bucket MAC: the first of ours that every member offers (a member that offers
    none, of an older version, has HMAC-SHA256)."""
    offers = [tuple(offer) or (HMAC_SHA256,) for offer in offers]
    for algorithm in MAC_ALGORITHMS:
        if all(algorithm in offer for offer in offers):
            return algorithm
    return HMAC_SHA256


class SealError(RuntimeError):
    """A store value that was not sealed under this epoch's secret for this key."""


def new_secret() -> bytes:
    """A fresh epoch secret."""
    return secrets.token_bytes(SECRET_BYTES)


def check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the weight-sync rendezvous needs the epoch secret of the JoinGroup event (at least "
            f"{MIN_SECRET_BYTES} bytes), got {len(secret)} bytes; a learner and a generator of "
            "different versions?"
        )


def _derive(secret: bytes, epoch: int, purpose: bytes) -> bytes:
    return hmac.new(secret, b"|".join([_LABEL, str(epoch).encode(), purpose]), "sha256").digest()


class EpochKeys:
    """The keys one epoch's secret yields: the store prefix, the value cipher and MAC."""

    def __init__(self, secret: bytes, epoch: int) -> None:
        check_secret(secret)
        self.epoch = epoch
        tag = _derive(secret, epoch, b"prefix").hex()[:_PREFIX_TAG_CHARS]
        self.prefix = f"epoch/{epoch}/{tag}"
        self._cipher_key = _derive(secret, epoch, b"cipher")
        self._mac_key = _derive(secret, epoch, b"mac")
        self._weights_key = _derive(secret, epoch, b"weights")

    def bucket_mac(
        self, publish_id: str, index: int, nbytes: int, algorithm: str = HMAC_SHA256
    ) -> BucketMac:
        """The MAC of one bucket of a publish, bytes still to be fed (``update``).

        Keyed by the epoch (its own key) and bound to the publish (``publish_id``, the
        manifest's ``checksum``), the bucket's index and its size: a bucket forged, altered,
        replayed from another publish or moved to another index does not authenticate.
        ``algorithm`` is the epoch's (``choose_mac``): HMAC-SHA256 or BLAKE3's keyed mode.
        """
        name = publish_id.encode()
        header = struct.pack(">I", len(name)) + name + struct.pack(">QQ", index, nbytes)
        if algorithm == HMAC_SHA256:
            return hmac.new(self._weights_key, header, "sha256")
        if algorithm == BLAKE3 and _blake3 is not None:
            # Hashes a large bucket on every core (here 4.9 GB/s on one core, 9.6 on two).
            mac: BucketMac = _blake3.blake3(
                header, key=self._weights_key, max_threads=_blake3.blake3.AUTO
            )
            return mac
        raise ValueError(f"bucket MAC {algorithm!r} is not available here (have {MAC_ALGORITHMS})")

    def _keystream(self, nonce: bytes, size: int) -> bytes:
        # HMAC-SHA256 as a PRF in counter mode: a stream cipher from the standard library.
        blocks = [
            hmac.new(self._cipher_key, nonce + struct.pack(">Q", i), "sha256").digest()
            for i in range((size + 31) // 32)
        ]
        return b"".join(blocks)[:size]

    def _mac(self, key: str, nonce: bytes, ciphertext: bytes) -> bytes:
        name = key.encode()
        message = struct.pack(">I", len(name)) + name + nonce + ciphertext
        return hmac.new(self._mac_key, message, "sha256").digest()

    def seal(self, key: str, value: bytes) -> bytes:
        """``value`` encrypted, then authenticated together with the key it is stored under."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        stream = self._keystream(nonce, len(value))
        ciphertext = bytes(a ^ b for a, b in zip(value, stream, strict=True))
        return nonce + ciphertext + self._mac(key, nonce, ciphertext)

    def open(self, key: str, sealed: bytes) -> bytes:
        """The value sealed for ``key``; ``SealError`` for anything else."""
        if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
            raise SealError(f"{self.prefix}/{key}: {len(sealed)} bytes is no sealed value")
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:-_TAG_BYTES]
        if not hmac.compare_digest(sealed[-_TAG_BYTES:], self._mac(key, nonce, ciphertext)):
            raise SealError(f"{self.prefix}/{key}: not sealed under this epoch's secret")
        stream = self._keystream(nonce, len(ciphertext))
        return bytes(a ^ b for a, b in zip(ciphertext, stream, strict=True))


def _as_bytes(value: str | bytes | list[int]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class SealedStore(dist.Store):
    """A store whose values are sealed under an epoch's secret, under the epoch's prefix.

    Handed to Gloo and NCCL as their rendezvous store, so their peer addresses and unique ids
    are sealed too. ``scope`` names this store's place below the prefix (``"pg/"``), so a value is
    bound to its full key. ``add`` (a counter, no secret in it) is passed through unsealed.
    """

    def __init__(self, inner: dist.Store, keys: EpochKeys, scope: str = "") -> None:
        # ``inner`` is already prefixed with ``keys.prefix`` and ``scope``.
        super().__init__()
        self.keys = keys
        self._inner = inner
        self._scope = scope

    @classmethod
    def for_epoch(cls, store: dist.Store, keys: EpochKeys) -> SealedStore:
        """The epoch's keys in ``store`` (the learner's TCPStore or a client of it)."""
        return cls(dist.PrefixStore(keys.prefix, store), keys)

    def child(self, scope: str) -> SealedStore:
        """The sealed store of the keys under ``scope/`` (the process group's own keys)."""
        return SealedStore(
            dist.PrefixStore(scope, self._inner), self.keys, f"{self._scope}{scope}/"
        )

    def set(self, key: str, value: str | bytes | list[int]) -> None:  # type: ignore[override]
        sealed = self.keys.seal(self._scope + key, _as_bytes(value))
        self._inner.set(key, sealed)  # type: ignore[arg-type]  # bytes, as the binding takes

    def get(self, key: str) -> bytes:
        """Blocks until ``key`` exists, like every store; raises ``SealError`` if it is forged."""
        return self.keys.open(self._scope + key, self._inner.get(key))

    def read_sealed(self, key: str) -> bytes | None:
        """``key``'s value if it exists and opens, else None (a forged value counts as absent)."""
        if not self._inner.check([key]):
            return None
        try:
            return self.get(key)
        except SealError:
            return None

    def check(self, keys: list[str]) -> bool:  # type: ignore[override]
        return self._inner.check(keys)

    def wait(  # type: ignore[override]
        self, keys: list[str], timeout: timedelta | None = None
    ) -> None:
        if timeout is None:
            self._inner.wait(keys)
        else:
            self._inner.wait(keys, timeout)

    def add(self, key: str, value: int) -> int:  # type: ignore[override]
        return self._inner.add(key, value)

    def delete_key(self, key: str) -> bool:  # type: ignore[override]
        return self._inner.delete_key(key)

    def num_keys(self) -> int:  # type: ignore[override]
        return self._inner.num_keys()

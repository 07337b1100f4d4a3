"""The interfaces of weight sync: what the learner loop publishes through, and the bucket
transport underneath.

``WeightPublisher`` is all the learner loop sees: publish version v to the current members (opening
a new group epoch first when membership changed), report who took part. Underneath, a
``BucketSender`` (learner) and one ``BucketReceiver`` per generator worker move flat buckets; the
manifest itself travels on the control plane first. ``services.weight_sync`` implements them with
a collective broadcast (Gloo on CPU, NCCL on GPU); another transport (CUDA IPC on one host, a
shared filesystem path) fits behind the same interfaces.

A publish never holds the whole model twice: ``plan_manifest`` lays the buckets out from names,
shapes and dtypes alone, and ``fill_buckets`` fills them from the learner's weights as they are
produced (gathered from the shards one tensor at a time, for a sharded learner), handing each
bucket to the transport as soon as it is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from lpreg_core.weights import BucketSpec, WeightManifest, dtype_name, plan_buckets

Layout = Iterable[tuple[str, torch.Size | tuple[int, ...], torch.dtype]]
"""(name, shape, dtype) of every tensor of a publish, in the order the weights come."""


@dataclass
class PublishResult:
    """The outcome of one publish: who was sent ``version`` and who confirmed loading it."""

    version: int
    members: list[str]
    loaded: dict[str, int] = field(default_factory=dict)
    ok: bool = True


class WeightPublisher(Protocol):
    """Learner side, as the learner loop uses it."""

    @property
    def members(self) -> list[str]:
        """Generator ids of the current group epoch."""
        ...

    @property
    def epoch(self) -> int: ...

    @property
    def last_published(self) -> int:
        """The last version sent successfully (-1 before the first)."""
        ...

    def needs_epoch(self) -> bool:
        """True when membership changed (or the last broadcast failed) since the epoch opened."""
        ...

    def publish(self, version: int, timeout_s: float, wait_loaded: bool) -> PublishResult:
        """Send the learner's current weights as ``version``; with ``wait_loaded``, also wait
        (bounded) until every member reports it loaded. Never raises for a dead member: it is
        dropped and the result says so."""
        ...

    def close(self) -> None: ...


class BucketSender(Protocol):
    """Learner side of the bucket transport (rank 0)."""

    @property
    def backend(self) -> str:
        """The collective backend members must use ("gloo", "nccl")."""
        ...

    @property
    def port(self) -> int:
        """Where members rendezvous."""
        ...

    def epoch_secret(self, epoch: int) -> bytes:
        """The rendezvous secret of ``epoch``, drawn fresh for it; members learn it only from the
        (authenticated) control plane, and nobody without it can claim a rank."""
        ...

    def open_epoch(self, epoch: int, world_size: int, join_timeout_s: float) -> None:
        """Form the group of ``world_size`` ranks, waiting at most ``join_timeout_s`` for them."""
        ...

    def send(self, flats: Sequence[Tensor], timeout_s: float) -> None:
        """Send buckets packed beforehand (``lpreg_core.weights.build_manifest``) and wait until
        every member has checked what it received."""
        ...

    def send_weights(
        self, manifest: WeightManifest, weights: Iterable[tuple[str, Tensor]], timeout_s: float
    ) -> None:
        """Send a publish planned by ``plan_manifest``, filling each bucket from ``weights`` only
        when the previous ones are on their way (``fill_buckets``), and wait until every member
        has checked what it received."""
        ...

    def close_epoch(self) -> None: ...

    def close(self) -> None: ...


class BucketReceiver(Protocol):
    """Generator side of the bucket transport, one per worker."""

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
        secret: bytes,
    ) -> None: ...

    def receive_buckets(
        self, manifest: WeightManifest, device: str, timeout_s: float
    ) -> AbstractContextManager[Iterator[tuple[str, Tensor]]]:
        """The published tensors, by name, one bucket at a time (at most two buckets alive):
        load each as it arrives. Closing the stream early drains the rest of the publish."""
        ...

    def leave(self) -> None: ...

    def close(self) -> None: ...


def layout_of(
    named_tensors: Iterable[tuple[str, Tensor]],
) -> list[tuple[str, torch.Size, torch.dtype]]:
    """The layout of some named tensors (shapes and dtypes only; no data is kept)."""
    return [(name, t.shape, t.dtype) for name, t in named_tensors]


def publish_id(version: int, manifest: WeightManifest) -> str:
    """Hex sha256 naming a publish: its version and its complete layout."""
    plan = {
        "version": version,
        "tensors": [[s.name, list(s.shape), s.dtype, s.bucket, s.offset] for s in manifest.tensors],
        "buckets": [[b.index, b.dtype, b.numel] for b in manifest.buckets],
    }
    return hashlib.sha256(json.dumps(plan, separators=(",", ":")).encode()).hexdigest()


def plan_manifest(version: int, layout: Layout, bucket_bytes: int) -> WeightManifest:
    """The manifest of a publish, from the names, shapes and dtypes of its tensors alone.

    Buckets are laid out as ``lpreg_core.weights.plan_buckets`` does, then numbered in the order
    they complete when the tensors come in ``layout`` order (a bucket of a rare dtype, norms
    among bfloat16 matrices, completes late), so ``fill_buckets`` can hand each one over as soon
    as it is full. No data goes into the manifest: its ``checksum`` names the publish
    (``publish_id``), and the transport authenticates the bytes of every bucket against it.
    """
    if version < 0:
        raise ValueError(f"version must be non-negative, got {version}")
    specs, buckets = plan_buckets(layout, bucket_bytes)
    last_tensor = {spec.bucket: position for position, spec in enumerate(specs)}
    order = sorted(range(len(buckets)), key=last_tensor.__getitem__)
    renumber = {old: new for new, old in enumerate(order)}
    manifest = WeightManifest(
        version=version,
        tensors=tuple(dataclasses.replace(s, bucket=renumber[s.bucket]) for s in specs),
        buckets=tuple(
            dataclasses.replace(buckets[old], index=new) for new, old in enumerate(order)
        ),
        checksum="",
        total_bytes=sum(b.nbytes for b in buckets),
    )
    return dataclasses.replace(manifest, checksum=publish_id(version, manifest))


TakeBuffer = Callable[[BucketSpec, torch.device], Tensor]


def fill_buckets(
    manifest: WeightManifest, weights: Iterable[tuple[str, Tensor]], take_buffer: TakeBuffer
) -> Iterator[tuple[BucketSpec, Tensor]]:
    """Each bucket of ``manifest`` as a flat tensor, in bucket order, filled from ``weights``.

    Tensors are drawn from ``weights`` only until the next bucket is complete, so at most the
    buckets still open (one per dtype, for weights in layout order) are held besides the ones
    the caller still holds. ``take_buffer(bucket, device)`` provides the flat buffer of a bucket
    (``bucket.numel`` elements of its dtype) on the device of its first tensor; a bucket made of
    one contiguous tensor is that tensor itself, uncopied. Raises ``ValueError`` when ``weights``
    names a tensor the manifest does not have, gives one twice or in another shape or dtype, or
    ends before every tensor came.
    """
    specs = {spec.name: spec for spec in manifest.tensors}
    sizes: dict[int, int] = {b.index: 0 for b in manifest.buckets}
    for spec in manifest.tensors:
        sizes[spec.bucket] += 1
    remaining = dict(sizes)
    filling: dict[int, Tensor] = {}
    ready: dict[int, Tensor] = {}
    next_index = 0
    seen: set[str] = set()
    with torch.no_grad():
        for name, tensor in weights:
            if name not in specs:
                raise ValueError(f"tensor {name!r} is not in the manifest of v{manifest.version}")
            spec = specs[name]
            if name in seen:
                raise ValueError(f"tensor {name!r} came twice")
            seen.add(name)
            if tuple(tensor.shape) != spec.shape or dtype_name(tensor.dtype) != spec.dtype:
                raise ValueError(
                    f"tensor {name!r} is {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, but "
                    f"the manifest says {spec.shape} {spec.dtype}"
                )
            bucket = manifest.buckets[spec.bucket]
            remaining[bucket.index] -= 1
            if sizes[bucket.index] == 1 and tensor.is_contiguous():
                flat = tensor.detach().reshape(-1)
            else:
                if bucket.index not in filling:
                    filling[bucket.index] = take_buffer(bucket, tensor.device)
                flat = filling[bucket.index]
                flat[spec.offset : spec.offset + spec.numel].copy_(tensor.reshape(-1))
            del tensor
            if remaining[bucket.index] == 0:
                filling.pop(bucket.index, None)
                ready[bucket.index] = flat
            del flat
            while next_index in ready:
                yield manifest.buckets[next_index], ready.pop(next_index)
                next_index += 1
    missing = [s.name for s in manifest.tensors if s.name not in seen]
    if missing:
        raise ValueError(
            f"the weights ended without {len(missing)} tensors of the manifest "
            f"(first: {missing[0]!r})"
        )

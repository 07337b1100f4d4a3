"""Weight-bucket planning for the learner -> generator broadcast.

A publish sends the full set of policy weights as a few large collective calls instead of one per
tensor. Tensors are grouped by dtype and laid end to end in flat "buckets" of at most
``bucket_bytes`` (a tensor is never split; one larger than ``bucket_bytes`` gets a bucket of its
own). The :class:`WeightManifest` says where every tensor lives (bucket, element offset, shape,
dtype) and a ``checksum`` naming the publish, so a receiver can preallocate its buffers before
the collective starts. :func:`build_manifest` packs everything up front and names the publish by a
sha256 over the bytes (tests and tools); the learner plans its manifest from the layout alone
(``lpreg_core.weight_sync.plan_manifest``) and authenticates each bucket with a MAC as it goes
(``services.weight_sync``).

The manifest travels over gRPC (``control_pb2.WeightManifest``) ahead of the tensors; this module
converts both ways and validates what it receives. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lpreg_core.wire.lpreg.v1 import control_pb2

_DTYPE_PREFIX = "torch."


@dataclass(frozen=True)
class TensorSpec:
    """Where one named tensor lives: ``flat[bucket][offset : offset + numel].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bucket: int
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketSpec:
    """One flat buffer of a single dtype, sent by one collective call."""

    index: int
    dtype: str
    numel: int
    nbytes: int


@dataclass(frozen=True)
class WeightManifest:
    """Everything a receiver needs before the tensors arrive, plus the checksum to verify them."""

    version: int
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[BucketSpec, ...]
    checksum: str
    total_bytes: int

    def tensors_in(self, bucket: int) -> list[TensorSpec]:
        """The specs of one bucket, in offset order."""
        return [s for s in self.tensors if s.bucket == bucket]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling the manifest uses)."""
    name = str(dtype)
    return name[len(_DTYPE_PREFIX) :] if name.startswith(_DTYPE_PREFIX) else name


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; anything that is not a torch dtype is an error."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} (expected e.g. 'float32', 'bfloat16')")
    return dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_buckets(
    params: Iterable[tuple[str, torch.Size | tuple[int, ...], torch.dtype]],
    bucket_bytes: int,
) -> tuple[list[TensorSpec], list[BucketSpec]]:
    """Lay out named tensors in flat per-dtype buckets of at most ``bucket_bytes`` each.

    Tensors keep their input order within a dtype; each dtype fills its own open bucket, which is
    closed when the next tensor would overflow it. A tensor larger than ``bucket_bytes`` gets a
    bucket of its own. Bucket indices follow the order in which buckets are opened.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    specs: list[TensorSpec] = []
    buckets: list[BucketSpec] = []
    # dtype -> index into `buckets` of the bucket still accepting tensors of that dtype.
    open_bucket: dict[torch.dtype, int] = {}
    seen: set[str] = set()
    for name, shape, dtype in params:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"tensor {name!r}: dtype must be a torch.dtype, got {dtype!r}")
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"tensor {name!r} has a negative dimension: {dims}")
        numel = math.prod(dims)
        itemsize = _itemsize(dtype)
        index = open_bucket.get(dtype)
        if (
            index is not None
            and buckets[index].numel > 0
            and (buckets[index].numel + numel) * itemsize > bucket_bytes
        ):
            del open_bucket[dtype]
            index = None
        if index is None:
            index = len(buckets)
            buckets.append(BucketSpec(index, dtype_name(dtype), 0, 0))
            open_bucket[dtype] = index
        bucket = buckets[index]
        specs.append(TensorSpec(name, dims, bucket.dtype, index, bucket.numel, numel))
        new_numel = bucket.numel + numel
        buckets[index] = BucketSpec(index, bucket.dtype, new_numel, new_numel * itemsize)
        if new_numel * itemsize >= bucket_bytes:
            del open_bucket[dtype]
    if not specs:
        raise ValueError("no tensors to plan: the parameter list is empty")
    return specs, buckets


def pack_bucket(
    bucket: BucketSpec, specs: Sequence[TensorSpec], tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Copy the tensors of ``bucket`` into one new flat, contiguous buffer.

    ``specs`` may hold the specs of every bucket; only those of ``bucket`` are used. The buffer is
    allocated on the device of the bucket's first tensor.
    """
    dtype = dtype_from_name(bucket.dtype)
    members = [s for s in specs if s.bucket == bucket.index]
    if not members:
        raise ValueError(f"bucket {bucket.index} has no tensors in the given specs")
    device = _tensor_for(members[0], tensors, dtype).device
    flat = torch.empty(bucket.numel, dtype=dtype, device=device)
    with torch.no_grad():
        for spec in members:
            tensor = _tensor_for(spec, tensors, dtype)
            if spec.offset + spec.numel > bucket.numel:
                raise ValueError(
                    f"tensor {spec.name!r} (offset {spec.offset}, numel {spec.numel}) does not "
                    f"fit bucket {bucket.index} of {bucket.numel} elements"
                )
            flat[spec.offset : spec.offset + spec.numel].copy_(tensor.reshape(-1))
    return flat


def _tensor_for(
    spec: TensorSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    try:
        tensor = tensors[spec.name]
    except KeyError:
        raise KeyError(f"tensor {spec.name!r} of bucket {spec.bucket} was not given") from None
    if tuple(tensor.shape) != spec.shape or tensor.dtype != dtype:
        raise ValueError(
            f"tensor {spec.name!r} is {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, "
            f"but the plan says {spec.shape} {spec.dtype}"
        )
    return tensor


def unpack_bucket(
    bucket: BucketSpec, specs: Sequence[TensorSpec], flat: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """Named views (no copies) of the tensors of ``bucket`` inside its flat buffer."""
    if flat.dim() != 1 or flat.numel() != bucket.numel:
        raise ValueError(
            f"bucket {bucket.index}: expected a flat buffer of {bucket.numel} elements, "
            f"got shape {tuple(flat.shape)}"
        )
    if flat.dtype != dtype_from_name(bucket.dtype):
        raise ValueError(
            f"bucket {bucket.index}: expected dtype {bucket.dtype}, got {dtype_name(flat.dtype)}"
        )
    return [
        (s.name, flat[s.offset : s.offset + s.numel].view(s.shape))
        for s in specs
        if s.bucket == bucket.index
    ]


def unpack_all(
    manifest: WeightManifest, flats: Sequence[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Named views of every tensor, in manifest order, over the flat buffers of all buckets."""
    if len(flats) != len(manifest.buckets):
        raise ValueError(f"expected {len(manifest.buckets)} flat buffers, got {len(flats)}")
    views: dict[str, torch.Tensor] = {}
    for bucket, flat in zip(manifest.buckets, flats, strict=True):
        views.update(unpack_bucket(bucket, manifest.tensors, flat))
    return [(s.name, views[s.name]) for s in manifest.tensors]


def checksum_of_buckets(flats: Iterable[torch.Tensor]) -> str:
    """Hex sha256 over the raw bytes of the flat buffers, in order.

    Bytes are hashed as stored (any dtype, bfloat16 included, is reinterpreted as uint8), so the
    digest is bit-exact and independent of how the numbers would print.
    """
    digest = hashlib.sha256()
    for flat in flats:
        if flat.numel() == 0:
            continue
        data = flat.detach().reshape(-1)
        if data.device.type != "cpu":
            data = data.cpu()
        digest.update(data.contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def build_manifest(
    version: int,
    named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    bucket_bytes: int,
) -> tuple[WeightManifest, list[torch.Tensor]]:
    """Plan, pack and checksum a publish; returns the manifest and the flat buffers to send."""
    if version < 0:
        raise ValueError(f"version must be non-negative, got {version}")
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        if name in tensors:
            raise ValueError(f"tensor name {name!r} appears twice")
        tensors[name] = tensor
    specs, buckets = plan_buckets(
        ((name, t.shape, t.dtype) for name, t in tensors.items()), bucket_bytes
    )
    flats = [pack_bucket(b, specs, tensors) for b in buckets]
    manifest = WeightManifest(
        version=version,
        tensors=tuple(specs),
        buckets=tuple(buckets),
        checksum=checksum_of_buckets(flats),
        total_bytes=sum(b.nbytes for b in buckets),
    )
    return manifest, flats


def validate_manifest(manifest: WeightManifest) -> None:
    """Check that the manifest is self-consistent; raises ValueError naming the first problem.

    A manifest arrives over the network and sizes the receiver's buffers, so it is checked before
    any allocation: buckets numbered 0..n-1, sizes that agree with the dtype, every tensor inside
    its bucket without overlap, and totals that add up.
    """
    if not manifest.tensors:
        raise ValueError("manifest has no tensors")
    itemsizes: dict[int, int] = {}
    for position, bucket in enumerate(manifest.buckets):
        if bucket.index != position:
            raise ValueError(f"bucket at position {position} has index {bucket.index}")
        itemsize = _itemsize(dtype_from_name(bucket.dtype))
        if bucket.nbytes != bucket.numel * itemsize:
            raise ValueError(
                f"bucket {bucket.index}: nbytes {bucket.nbytes} != numel {bucket.numel} x "
                f"{itemsize} bytes of {bucket.dtype}"
            )
        itemsizes[bucket.index] = itemsize
    extents: dict[int, list[tuple[int, int, str]]] = {b.index: [] for b in manifest.buckets}
    names: set[str] = set()
    for spec in manifest.tensors:
        if spec.name in names:
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        names.add(spec.name)
        if spec.bucket not in extents:
            raise ValueError(f"tensor {spec.name!r} names bucket {spec.bucket}, which is absent")
        bucket = manifest.buckets[spec.bucket]
        if spec.dtype != bucket.dtype:
            raise ValueError(
                f"tensor {spec.name!r} is {spec.dtype} but bucket {bucket.index} is {bucket.dtype}"
            )
        if any(d < 0 for d in spec.shape) or math.prod(spec.shape) != spec.numel:
            raise ValueError(
                f"tensor {spec.name!r}: shape {spec.shape} has not {spec.numel} elements"
            )
        if spec.offset + spec.numel > bucket.numel:
            raise ValueError(
                f"tensor {spec.name!r} (offset {spec.offset}, numel {spec.numel}) overruns "
                f"bucket {bucket.index} of {bucket.numel} elements"
            )
        extents[spec.bucket].append((spec.offset, spec.offset + spec.numel, spec.name))
    for index, spans in extents.items():
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise ValueError(f"tensors {first!r} and {second!r} overlap in bucket {index}")
    total = sum(b.nbytes for b in manifest.buckets)
    if manifest.total_bytes != total:
        raise ValueError(f"total_bytes {manifest.total_bytes} != sum of bucket sizes {total}")


def manifest_to_proto(manifest: WeightManifest) -> control_pb2.WeightManifest:
    """The wire form sent over gRPC ahead of the tensors."""
    return control_pb2.WeightManifest(
        version=manifest.version,
        tensors=[
            control_pb2.TensorSpec(
                name=s.name,
                shape=list(s.shape),
                dtype=s.dtype,
                bucket=s.bucket,
                offset=s.offset,
                numel=s.numel,
            )
            for s in manifest.tensors
        ],
        buckets=[
            control_pb2.Bucket(index=b.index, dtype=b.dtype, numel=b.numel, nbytes=b.nbytes)
            for b in manifest.buckets
        ],
        checksum=manifest.checksum,
        total_bytes=manifest.total_bytes,
    )


def manifest_from_proto(proto: control_pb2.WeightManifest) -> WeightManifest:
    """Decode and validate a received manifest; raises ValueError if it is inconsistent."""
    manifest = WeightManifest(
        version=proto.version,
        tensors=tuple(
            TensorSpec(
                name=t.name,
                shape=tuple(int(d) for d in t.shape),
                dtype=t.dtype,
                bucket=t.bucket,
                offset=t.offset,
                numel=t.numel,
            )
            for t in proto.tensors
        ),
        buckets=tuple(
            BucketSpec(index=b.index, dtype=b.dtype, numel=b.numel, nbytes=b.nbytes)
            for b in proto.buckets
        ),
        checksum=proto.checksum,
        total_bytes=proto.total_bytes,
    )
    validate_manifest(manifest)
    return manifest

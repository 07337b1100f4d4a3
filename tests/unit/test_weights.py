"""Weight-bucket planning, packing, checksums and the manifest's wire form."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpreg_core.weights import (
    BucketSpec,
    TensorSpec,
    WeightManifest,
    build_manifest,
    checksum_of_buckets,
    dtype_from_name,
    manifest_from_proto,
    manifest_to_proto,
    pack_bucket,
    plan_buckets,
    unpack_all,
    unpack_bucket,
    validate_manifest,
)
from lpreg_core.wire.lpreg.v1 import control_pb2


def mixed_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(4, 8, generator=g),  # 128 B float32
        "b": torch.randn(16, generator=g).to(torch.bfloat16),  # 32 B
        "c": torch.randn(8, 4, generator=g),  # 128 B float32
        "big": torch.randn(100, generator=g),  # 400 B: larger than a bucket
        "d": torch.randn(3, generator=g).to(torch.bfloat16),  # 6 B
        "e": torch.arange(5, dtype=torch.int64),  # 40 B
        "scalar": torch.tensor(2.5),  # 4 B float32, shape ()
    }


def test_plan_groups_by_dtype_and_never_splits_a_tensor() -> None:
    w = mixed_weights()
    specs, buckets = plan_buckets(((n, t.shape, t.dtype) for n, t in w.items()), 256)
    by_name = {s.name: s for s in specs}

    assert [(b.index, b.dtype, b.numel, b.nbytes) for b in buckets] == [
        (0, "float32", 64, 256),  # a + c fill it exactly, which closes it
        (1, "bfloat16", 19, 38),  # b + d share a bucket although other dtypes come between
        (2, "float32", 100, 400),  # big: larger than a bucket, alone
        (3, "int64", 5, 40),
        (4, "float32", 1, 4),  # scalar: the float32 buckets before it were closed
    ]
    assert [(s.name, s.bucket, s.offset, s.numel) for s in specs] == [
        ("a", 0, 0, 32),
        ("b", 1, 0, 16),
        ("c", 0, 32, 32),
        ("big", 2, 0, 100),
        ("d", 1, 16, 3),
        ("e", 3, 0, 5),
        ("scalar", 4, 0, 1),
    ]
    assert by_name["scalar"].shape == ()
    for b in buckets:
        members = [s for s in specs if s.bucket == b.index]
        assert sum(s.numel for s in members) == b.numel
        assert all(s.dtype == b.dtype for s in members)
        # Only a bucket holding a single tensor may exceed the limit.
        assert b.nbytes <= 256 or len(members) == 1


def test_plan_bucket_indices_follow_opening_order_and_specs_follow_input_order() -> None:
    w = mixed_weights()
    specs, buckets = plan_buckets(((n, t.shape, t.dtype) for n, t in w.items()), 256)
    assert [s.name for s in specs] == list(w)
    assert [b.index for b in buckets] == list(range(len(buckets)))
    first_use = [min(i for i, s in enumerate(specs) if s.bucket == b.index) for b in buckets]
    assert first_use == sorted(first_use)


def test_plan_rejects_empty_duplicate_and_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        plan_buckets([], 1024)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([("x", (2,), torch.float32), ("x", (2,), torch.float32)], 1024)
    with pytest.raises(ValueError, match="positive"):
        plan_buckets([("x", (2,), torch.float32)], 0)
    with pytest.raises(TypeError, match="torch.dtype"):
        plan_buckets([("x", (2,), "float32")], 1024)  # type: ignore[list-item]


def test_a_zero_size_tensor_takes_no_room_and_round_trips() -> None:
    w = {"empty": torch.empty(0, 3), "x": torch.ones(4)}
    manifest, flats = build_manifest(0, w, 16)
    views = dict(unpack_all(manifest, flats))
    assert views["empty"].shape == (0, 3)
    assert torch.equal(views["x"], w["x"])
    assert manifest.total_bytes == 16


def test_pack_then_unpack_is_bit_exact_and_unpack_returns_views() -> None:
    w = mixed_weights()
    w["nan"] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)
    specs, buckets = plan_buckets(((n, t.shape, t.dtype) for n, t in w.items()), 256)
    for bucket in buckets:
        flat = pack_bucket(bucket, specs, w)
        assert flat.is_contiguous() and flat.dim() == 1 and flat.numel() == bucket.numel
        assert flat.dtype == dtype_from_name(bucket.dtype)
        for name, view in unpack_bucket(bucket, specs, flat):
            assert view.shape == w[name].shape and view.dtype == w[name].dtype
            assert torch.equal(
                view.view(-1).view(torch.uint8), w[name].reshape(-1).view(torch.uint8)
            )
            assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_pack_copies_non_contiguous_tensors_and_checks_shapes() -> None:
    t = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    specs, buckets = plan_buckets([("t", t.shape, t.dtype)], 1024)
    flat = pack_bucket(buckets[0], specs, {"t": t})
    ((_, view),) = unpack_bucket(buckets[0], specs, flat)
    assert torch.equal(view, t)
    with pytest.raises(ValueError, match="plan says"):
        pack_bucket(buckets[0], specs, {"t": torch.zeros(4, 4)})
    with pytest.raises(KeyError, match="'t'"):
        pack_bucket(buckets[0], specs, {})
    with pytest.raises(ValueError, match="expected a flat buffer"):
        unpack_bucket(buckets[0], specs, torch.zeros(3))


def test_checksum_is_sha256_of_raw_bytes_in_bucket_order() -> None:
    a = torch.tensor([1.0, -2.0], dtype=torch.float32)
    b = torch.tensor([0.5, 3.0, -1.0], dtype=torch.bfloat16)
    want = hashlib.sha256(a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes()).hexdigest()
    assert checksum_of_buckets([a, b]) == want
    assert checksum_of_buckets([b, a]) != want


def test_checksum_sees_a_single_flipped_bit_in_bfloat16() -> None:
    b = torch.randn(64).to(torch.bfloat16)
    flipped = b.clone()
    flipped.view(torch.int16)[17] ^= 1
    assert checksum_of_buckets([b]) != checksum_of_buckets([flipped])


def test_build_manifest_returns_packed_buckets_and_their_checksum() -> None:
    w = mixed_weights()
    manifest, flats = build_manifest(7, w, 256)
    assert manifest.version == 7
    assert len(flats) == len(manifest.buckets) >= 4
    assert manifest.checksum == checksum_of_buckets(flats)
    assert manifest.total_bytes == sum(f.numel() * f.element_size() for f in flats)
    assert manifest.total_bytes == sum(t.numel() * t.element_size() for t in w.values())
    validate_manifest(manifest)
    restored = dict(unpack_all(manifest, flats))
    assert list(restored) == list(w)
    for name, t in w.items():
        assert torch.equal(restored[name], t)
    # The flats are copies: training may go on while they are being sent.
    w["a"].add_(1.0)
    assert not torch.equal(restored["a"], w["a"])


def test_manifest_proto_round_trip() -> None:
    manifest, _ = build_manifest(3, mixed_weights(), 256)
    proto = manifest_to_proto(manifest)
    wire = control_pb2.WeightManifest.FromString(proto.SerializeToString())
    assert manifest_from_proto(wire) == manifest
    assert wire.tensors[1].dtype == "bfloat16"


def _corrupt(manifest: WeightManifest, **changes: Any) -> control_pb2.WeightManifest:
    return manifest_to_proto(dataclasses.replace(manifest, **changes))


def test_manifest_from_proto_rejects_inconsistent_manifests() -> None:
    manifest, _ = build_manifest(1, mixed_weights(), 256)
    t0, t1 = manifest.tensors[0], manifest.tensors[1]
    b0 = manifest.buckets[0]
    cases: dict[str, dict[str, Any]] = {
        "overruns": dict(tensors=(dataclasses.replace(t0, offset=b0.numel), *manifest.tensors[1:])),
        "overlap": dict(
            tensors=(t0, dataclasses.replace(manifest.tensors[2], offset=1), *manifest.tensors[3:])
        ),
        "absent": dict(tensors=(dataclasses.replace(t0, bucket=99), *manifest.tensors[1:])),
        "elements": dict(tensors=(dataclasses.replace(t0, shape=(3, 3)), *manifest.tensors[1:])),
        "is bfloat16": dict(
            tensors=(t0, dataclasses.replace(t1, dtype="float32"), *manifest.tensors[2:])
        ),
        "nbytes": dict(buckets=(dataclasses.replace(b0, nbytes=1), *manifest.buckets[1:])),
        "has index": dict(buckets=(dataclasses.replace(b0, index=5), *manifest.buckets[1:])),
        "total_bytes": dict(total_bytes=manifest.total_bytes + 1),
        "unknown tensor dtype": dict(
            buckets=(dataclasses.replace(b0, dtype="float99"), *manifest.buckets[1:])
        ),
        "no tensors": dict(tensors=()),
    }
    for message, changes in cases.items():
        with pytest.raises(ValueError, match=message):
            manifest_from_proto(_corrupt(manifest, **changes))


def test_dtype_names_round_trip() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8):
        spec = plan_buckets([("x", (1,), dtype)], 1024)[1][0]
        assert dtype_from_name(spec.dtype) is dtype
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        dtype_from_name("Tensor")


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int8]


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(
            st.lists(st.integers(0, 7), min_size=0, max_size=3),
            st.sampled_from(range(len(DTYPES))),
        ),
        min_size=1,
        max_size=12,
    ),
    bucket_bytes=st.integers(1, 200),
)
def test_any_plan_round_trips_bit_exactly(
    shapes: list[tuple[list[int], int]], bucket_bytes: int
) -> None:
    g = torch.Generator().manual_seed(len(shapes) * 1000 + bucket_bytes)
    weights = {
        f"p{i}": (torch.randn(shape, generator=g) * 100).to(DTYPES[d])
        for i, (shape, d) in enumerate(shapes)
    }
    manifest, flats = build_manifest(1, weights, bucket_bytes)
    validate_manifest(manifest)
    manifest = manifest_from_proto(manifest_to_proto(manifest))
    for bucket in manifest.buckets:
        members = manifest.tensors_in(bucket.index)
        assert bucket.nbytes <= bucket_bytes or len([m for m in members if m.numel]) <= 1
    restored = dict(unpack_all(manifest, flats))
    for name, t in weights.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape
        assert torch.equal(
            restored[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        )


def test_spec_types_are_plain_frozen_dataclasses() -> None:
    spec = TensorSpec("x", (2,), "float32", 0, 0, 2)
    bucket = BucketSpec(0, "float32", 2, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.offset = 1  # type: ignore[misc]
    assert dataclasses.asdict(bucket) == {"index": 0, "dtype": "float32", "numel": 2, "nbytes": 8}

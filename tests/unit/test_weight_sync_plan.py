"""A publish planned from the layout alone and filled lazily from the weights, the bucket MACs and
the receive buffers: no network here (tests/integration/test_broadcast.py sends them)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from lpreg_core.weight_sync import fill_buckets, layout_of, plan_manifest
from lpreg_core.weights import (
    BucketSpec,
    build_manifest,
    dtype_from_name,
    unpack_all,
    validate_manifest,
)
from services.weight_sync.integrity import MAC_BYTES, BufferAccount, feed, wire_chunks
from services.weight_sync.rendezvous import (
    HMAC_SHA256,
    MAC_ALGORITHMS,
    EpochKeys,
    choose_mac,
    new_secret,
)

BUCKET_BYTES = 4096


def take(bucket: BucketSpec, device: torch.device) -> torch.Tensor:
    return torch.empty(bucket.numel, dtype=dtype_from_name(bucket.dtype), device=device)


def model(num_layers: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """bfloat16 matrices (two per 4 KiB bucket) with float32 norms among them."""
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        weights[f"layers.{i}.norm"] = torch.randn(16, generator=g)
        weights[f"layers.{i}.up"] = torch.randn(32, 32, generator=g).to(torch.bfloat16)
        weights[f"layers.{i}.down"] = torch.randn(32, 32, generator=g).to(torch.bfloat16)
    weights["lm_head"] = torch.randn(64, 64, generator=g)  # 16 KiB: a bucket of its own
    return weights


def test_the_plan_numbers_buckets_in_the_order_the_weights_complete_them() -> None:
    weights = model()
    manifest = plan_manifest(3, layout_of(weights.items()), BUCKET_BYTES)
    validate_manifest(manifest)
    position = {name: i for i, name in enumerate(weights)}
    last = [max(position[s.name] for s in manifest.tensors_in(b.index)) for b in manifest.buckets]
    assert last == sorted(last)
    # The float32 norms share one bucket that completes late, after the bfloat16 ones.
    norms = {s.bucket for s in manifest.tensors if s.name.endswith("norm")}
    assert len(norms) == 1 and norms.pop() > 0
    assert manifest.total_bytes == sum(t.numel() * t.element_size() for t in weights.values())


def test_the_manifest_names_its_version_and_layout_not_the_data() -> None:
    weights = model()
    layout = layout_of(weights.items())
    first = plan_manifest(1, layout, BUCKET_BYTES)
    assert plan_manifest(1, layout_of(model(seed=5).items()), BUCKET_BYTES) == first
    assert plan_manifest(2, layout, BUCKET_BYTES).checksum != first.checksum
    assert plan_manifest(1, layout, 2 * BUCKET_BYTES).checksum != first.checksum
    assert len(first.checksum) == 64


def test_buckets_are_filled_from_the_weights_only_as_far_as_the_next_bucket_needs() -> None:
    weights = model()
    manifest = plan_manifest(1, layout_of(weights.items()), BUCKET_BYTES)
    produced: list[str] = []
    live = {"buffers": 0, "peak": 0}

    def gathered() -> Iterator[tuple[str, torch.Tensor]]:
        # Fresh tensors, as gathering each one from the shards makes them.
        for name, tensor in weights.items():
            produced.append(name)
            yield name, tensor.clone()

    def take_buffer(bucket: BucketSpec, device: torch.device) -> torch.Tensor:
        buffer = take(bucket, device)
        live["buffers"] += 1
        live["peak"] = max(live["peak"], live["buffers"])
        weakref.finalize(buffer.untyped_storage(), lambda: live.update(buffers=live["buffers"] - 1))
        return buffer

    flats = []
    for bucket, flat in fill_buckets(manifest, gathered(), take_buffer):
        # Drawn exactly up to the last tensor this bucket needs, not one further.
        needed = max(list(weights).index(s.name) for s in manifest.tensors_in(bucket.index))
        assert len(produced) == needed + 1, (bucket.index, len(produced))
        assert len(produced) < len(weights) or bucket.index >= len(manifest.buckets) - 2
        flats.append(flat.clone())  # the transport's copy; the buffer itself goes
        del flat
        gc.collect()
    # The bucket being filled, the norms' bucket that stays open, and one handed over.
    assert live["peak"] <= 3 < len(manifest.buckets)
    for name, tensor in unpack_all(manifest, flats):
        assert torch.equal(tensor, weights[name]), name


def test_a_bucket_of_one_tensor_is_sent_from_the_tensor_itself() -> None:
    weights = model(num_layers=1)
    manifest = plan_manifest(1, layout_of(weights.items()), BUCKET_BYTES)
    buckets = dict(
        (b.index, flat)
        for b, flat in fill_buckets(manifest, weights.items(), take)
        if len(manifest.tensors_in(b.index)) == 1
    )
    (lm_head,) = [s.bucket for s in manifest.tensors if s.name == "lm_head"]
    assert buckets[lm_head].data_ptr() == weights["lm_head"].data_ptr()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([("layers.0.norm", torch.zeros(16)), ("stray", torch.zeros(1))], "not in the manifest"),
        ([("layers.0.norm", torch.zeros(16)), ("layers.0.norm", torch.zeros(16))], "twice"),
        ([("layers.0.norm", torch.zeros(17))], "the manifest says"),
        ([("layers.0.norm", torch.zeros(16, dtype=torch.float64))], "the manifest says"),
        ([("layers.0.norm", torch.zeros(16))], "ended without"),
    ],
)
def test_weights_that_do_not_match_the_manifest_are_refused(
    weights: list[tuple[str, torch.Tensor]], message: str
) -> None:
    manifest = plan_manifest(1, layout_of(model(num_layers=1).items()), BUCKET_BYTES)
    with pytest.raises(ValueError, match=message):
        for _ in fill_buckets(manifest, weights, take):
            pass


def test_the_lazy_plan_sends_what_build_manifest_packs() -> None:
    weights = model()
    packed, flats = build_manifest(1, weights, BUCKET_BYTES)
    manifest = plan_manifest(1, layout_of(weights.items()), BUCKET_BYTES)
    lazy = [flat.clone() for _, flat in fill_buckets(manifest, weights.items(), take)]
    assert sorted(f.numel() for f in lazy) == sorted(f.numel() for f in flats)
    sent, packed_views = dict(unpack_all(manifest, lazy)), dict(unpack_all(packed, flats))
    assert sent.keys() == packed_views.keys() == weights.keys()
    for name, tensor in sent.items():
        assert torch.equal(tensor, packed_views[name]), name


@pytest.mark.parametrize("algorithm", MAC_ALGORITHMS)
def test_a_bucket_mac_binds_the_epoch_secret_publish_index_and_every_bit(algorithm: str) -> None:
    def mac(keys: EpochKeys, publish: str, index: int, data: torch.Tensor) -> bytes:
        digest = keys.bucket_mac(publish, index, data.numel() * data.element_size(), algorithm)
        feed(digest, data)
        return digest.digest()

    secret = new_secret()
    keys = EpochKeys(secret, 1)
    data = torch.randn(1000)
    good = mac(keys, "p", 0, data)
    assert len(good) == MAC_BYTES
    assert mac(EpochKeys(secret, 1), "p", 0, data) == good
    flipped = data.clone()
    flipped.view(torch.uint8)[1234] ^= 1
    others = [
        mac(EpochKeys(secret, 2), "p", 0, data),
        mac(EpochKeys(new_secret(), 1), "p", 0, data),
        mac(keys, "q", 0, data),
        mac(keys, "p", 1, data),
        mac(keys, "p", 0, flipped),
        mac(keys, "p", 0, data[:-1]),
    ]
    assert good not in others and len(set(others)) == len(others)


def test_the_epoch_uses_the_fastest_mac_every_member_can_check() -> None:
    assert choose_mac([MAC_ALGORITHMS, MAC_ALGORITHMS]) == MAC_ALGORITHMS[0]
    # One member without BLAKE3 (or of a version that offers nothing): HMAC-SHA256 for all.
    assert choose_mac([MAC_ALGORITHMS, [HMAC_SHA256]]) == HMAC_SHA256
    assert choose_mac([MAC_ALGORITHMS, []]) == HMAC_SHA256
    assert choose_mac([["something-else"]]) == HMAC_SHA256
    with pytest.raises(ValueError, match="not available"):
        EpochKeys(new_secret(), 1).bucket_mac("p", 0, 0, "md5")


def test_wire_chunks_cover_a_bucket_in_order() -> None:
    flat = torch.arange(10_000_000, dtype=torch.float32)
    chunks = wire_chunks(flat)
    assert len(chunks) == 3
    assert torch.equal(torch.cat(chunks), flat)
    assert wire_chunks(torch.empty(0)) == []


def test_host_receive_memory_is_lent_again_only_when_nothing_views_it() -> None:
    account = BufferAccount(keep=2)
    cpu = torch.device("cpu")
    first = account.empty(256, torch.float32, cpu)
    address = first.data_ptr()
    held = first[10:20].view(torch.int16)  # a consumer's view, reinterpreted
    del first
    gc.collect()
    assert account.live_bytes == 1024
    second = account.empty(256, torch.float32, cpu)
    assert second.data_ptr() != address  # still viewed: not lent again
    del held
    gc.collect()
    assert account.kept_bytes == 1024
    third = account.empty(128, torch.bfloat16, cpu)
    assert third.data_ptr() == address  # nothing views it: lent again, no fresh pages
    assert account.peak_bytes == 2048
    del second, third
    gc.collect()
    assert account.live_bytes == 0 and account.kept_bytes == 2048

"""Receive memory is bounded by the bucket size, not the model: measured in real receiver
processes over Gloo (tests/integration/_broadcast_worker.py, driven as in test_broadcast.py) and
in the hf generator backend.

Two measurements per receiver: the receive path's own accounting (every buffer it allocates,
counted until the last reference to it is gone, the consumer's included) and the kernel's peak
resident set (VmHWM, restarted before the receive). Each is checked against a control that keeps
every tensor, as receiving the whole model at once does, so a measurement that could not tell the
two apart would fail.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_broadcast import (
    JOIN_TIMEOUT_S,
    SEND_TIMEOUT_S,
    WORKER_START_TIMEOUT_S,
    Worker,
    expected_digests,
    open_epoch,
)

from lpreg_core.config import BroadcastConfig, HFBackendConfig, ModelConfig
from lpreg_core.weights import WeightManifest, build_manifest, manifest_to_proto
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup
from services.generator.backends.base import SampleRequest
from services.weight_sync import ChecksumMismatch, WeightSender

pytestmark = pytest.mark.integration

TINY_MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"
NUM_BUCKETS = 8
SMALL_BUCKET_BYTES = 256 * 1024
# Large enough that resident memory shows a bucket above the interpreter's own noise, and above
# glibc's 32 MiB ceiling of its dynamic mmap threshold: smaller freed blocks stay in the heap for
# reuse, so resident memory then also counts a few freed buckets (16 MiB buckets: ~6 of them,
# constant from the second publish on). Production buckets (64 MiB by default) are above it too.
LARGE_BUCKET_BYTES = 40 * 1024 * 1024
# The receive path holds the bucket being consumed, plus the previous one while the consumer
# still references its last tensor.
MAX_LIVE_BUCKETS = 2
# Resident memory also holds allocator slack and Gloo's buffers: a few buckets, never the model.
MAX_RSS_GROWTH_BUCKETS = 4
# Receiving 320 MiB over loopback Gloo and hashing it twice on a loaded 2-core machine.
LARGE_SEND_TIMEOUT_S = 120.0


@pytest.fixture
def spawn_workers(tmp_path: Path) -> Iterator[Callable[[int], list[Worker]]]:
    workers: list[Worker] = []

    def spawn(n: int) -> list[Worker]:
        new = [Worker(tmp_path / f"worker-{len(workers) + i}.log") for i in range(n)]
        workers.extend(new)
        for w in new:
            w.ok(WORKER_START_TIMEOUT_S)
        return new

    yield spawn
    for w in workers:
        w.stop()


def make_sender(bucket_bytes: int) -> WeightSender:
    config = BroadcastConfig.model_validate(
        {"store_host": "127.0.0.1", "store_port": 0, "bucket_bytes": bucket_bytes}
    )
    return WeightSender(config, "cpu")


def bucket_weights(bucket_bytes: int, seed: int) -> dict[str, torch.Tensor]:
    """Two float32 tensors per bucket, NUM_BUCKETS buckets: exactly NUM_BUCKETS x bucket_bytes."""
    g = torch.Generator().manual_seed(seed)
    numel = bucket_bytes // 4 // 2
    return {
        f"layers.{i // 2}.{'up' if i % 2 else 'down'}.weight": torch.randn(
            numel // 64, 64, generator=g
        )
        for i in range(2 * NUM_BUCKETS)
    }


def publish_and_collect(
    sender: WeightSender,
    members: list[Worker],
    weights: dict[str, torch.Tensor],
    version: int,
    timeout_s: float = SEND_TIMEOUT_S,
    **receive_options: Any,
) -> list[dict[str, Any]]:
    bucket_bytes = sum(t.numel() * t.element_size() for t in weights.values()) // NUM_BUCKETS
    manifest, flats = build_manifest(version, weights, bucket_bytes)
    assert len(manifest.buckets) == NUM_BUCKETS
    for worker in members:
        worker.command(
            op="receive", manifest=manifest_hex(manifest), timeout_s=timeout_s, **receive_options
        )
    sender.send(flats, timeout_s)
    return [worker.ok(timeout_s) for worker in members]


def manifest_hex(manifest: WeightManifest) -> str:
    return str(manifest_to_proto(manifest).SerializeToString().hex())


@pytest.mark.timeout(120)
def test_two_receivers_hold_at_most_two_buckets_of_an_eight_bucket_model(
    spawn_workers: Callable[[int], list[Worker]], record_property: pytest.RecordProperty
) -> None:
    members = spawn_workers(2)
    weights = bucket_weights(SMALL_BUCKET_BYTES, seed=1)
    model_bytes = NUM_BUCKETS * SMALL_BUCKET_BYTES
    with make_sender(SMALL_BUCKET_BYTES) as sender:
        open_epoch(sender, 1, members)
        replies = publish_and_collect(sender, members, weights, version=1)
        # The control: a consumer that keeps every tensor holds the whole model, and the
        # accounting says so.
        kept = publish_and_collect(sender, members, weights, version=2, keep_tensors=True)

    want = expected_digests(weights)
    for reply in replies:
        assert reply["tensors"] == want, "received tensors are not bit-identical"
        assert reply["buckets_received"] == NUM_BUCKETS
        assert (
            SMALL_BUCKET_BYTES
            <= reply["peak_buffer_bytes"]
            <= MAX_LIVE_BUCKETS * (SMALL_BUCKET_BYTES)
        ), reply["peak_buffer_bytes"]
        assert reply["live_buffer_bytes"] == 0, "a receive buffer outlived its consumer"
    for reply in kept:
        assert reply["tensors"] == want
        assert reply["peak_buffer_bytes"] == model_bytes
    peaks = [r["peak_buffer_bytes"] for r in replies]
    record_property("model_bytes", model_bytes)
    record_property("peak_receive_buffer_bytes", peaks)
    print(
        f"\n{NUM_BUCKETS} buckets of {SMALL_BUCKET_BYTES} B: peak receive buffers per receiver "
        f"{peaks} B (whole-model control: {[r['peak_buffer_bytes'] for r in kept]} B)"
    )


@pytest.mark.timeout(300)
def test_resident_memory_grows_by_a_few_buckets_not_by_the_model(
    spawn_workers: Callable[[int], list[Worker]], record_property: pytest.RecordProperty
) -> None:
    members = spawn_workers(2)
    weights = bucket_weights(LARGE_BUCKET_BYTES, seed=2)
    model_bytes = NUM_BUCKETS * LARGE_BUCKET_BYTES
    with make_sender(LARGE_BUCKET_BYTES) as sender:
        open_epoch(sender, 1, members)
        baselines = []
        for worker in members:
            worker.command(op="resources")
            baselines.append(worker.ok()["rss_bytes"])
        options = {"measure_rss": True, "timeout_s": LARGE_SEND_TIMEOUT_S}
        streamed = publish_and_collect(sender, members, weights, version=1, **options)
        again = publish_and_collect(sender, members, weights, version=2, **options)
        kept = publish_and_collect(
            sender, members, weights, version=3, keep_tensors=True, **options
        )

    # Growth of the resident set over what the process held before its first publish: it also
    # counts what the allocator kept from earlier publishes.
    def growth(replies: list[dict[str, Any]]) -> list[int]:
        return [r["rss_peak_bytes"] - b for r, b in zip(replies, baselines, strict=True)]

    want = expected_digests(weights)
    record_property("model_bytes", model_bytes)
    record_property("rss_peak_growth_bytes", growth(streamed) + growth(again))
    record_property("rss_peak_growth_bytes_whole_model", growth(kept))
    print(
        f"\n{NUM_BUCKETS} buckets of {LARGE_BUCKET_BYTES >> 20} MiB ({model_bytes >> 20} MiB): "
        f"peak RSS growth per receiver {[g >> 20 for g in growth(streamed)]} MiB (first "
        f"publish), {[g >> 20 for g in growth(again)]} MiB (second); "
        f"{[g >> 20 for g in growth(kept)]} MiB keeping every tensor"
    )
    for replies in (streamed, again):
        for reply, grown in zip(replies, growth(replies), strict=True):
            assert reply["tensors"] == want
            assert reply["peak_buffer_bytes"] <= MAX_LIVE_BUCKETS * LARGE_BUCKET_BYTES
            assert grown < MAX_RSS_GROWTH_BUCKETS * LARGE_BUCKET_BYTES
    for reply, grown in zip(kept, growth(kept), strict=True):
        assert reply["tensors"] == want
        # The measurement sees a whole model when one is held.
        assert grown >= model_bytes


@pytest.mark.timeout(120)
def test_a_member_that_stops_consuming_drains_the_publish_and_nobody_else_notices(
    spawn_workers: Callable[[int], list[Worker]],
) -> None:
    quitter, member = spawn_workers(2)
    weights = bucket_weights(SMALL_BUCKET_BYTES, seed=3)
    manifest, flats = build_manifest(1, weights, SMALL_BUCKET_BYTES)
    with make_sender(SMALL_BUCKET_BYTES) as sender:
        open_epoch(sender, 1, [quitter, member])
        quitter.command(
            op="receive",
            manifest=manifest_hex(manifest),
            timeout_s=SEND_TIMEOUT_S,
            close_after_buckets=3,
        )
        member.command(op="receive", manifest=manifest_hex(manifest), timeout_s=SEND_TIMEOUT_S)
        sender.send(flats, SEND_TIMEOUT_S)  # every member took and checked every byte
        stopped, complete = quitter.ok(), member.ok()
        assert sender.epoch == 1

        want = expected_digests(weights)
        assert complete["tensors"] == want
        # The quitter loaded three buckets' tensors, then received and checked the rest.
        assert stopped["buckets_received"] == NUM_BUCKETS
        assert 0 < len(stopped["tensors"]) < len(want)
        # The epoch is intact: the next publish reaches both.
        again = publish_and_collect(sender, [quitter, member], weights, version=2)
    assert all(r["tensors"] == want for r in again)


# -- the hf generator backend ---------------------------------------------------------------------
def tiny_policy(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
        for name, p in model.named_parameters()
    }


@dataclasses.dataclass
class HFHarness:
    backend: Any  # HFBackend
    sender: WeightSender
    pool: concurrent.futures.ThreadPoolExecutor

    def publish(self, manifest: Any, flats: list[torch.Tensor]) -> concurrent.futures.Future[str]:
        loading = self.pool.submit(self.backend.update_weights, manifest, SEND_TIMEOUT_S)
        try:
            self.sender.send(flats, SEND_TIMEOUT_S)
        finally:
            loading.exception(timeout=SEND_TIMEOUT_S)
        return loading


HF_BUCKET_BYTES = 64 * 1024


@pytest.fixture
def hf() -> Iterator[HFHarness]:
    from services.generator.backends.hf import HFBackend

    backend = HFBackend(HFBackendConfig(), ModelConfig(path=str(TINY_MODEL)), seed=0)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    sender = make_sender(HF_BUCKET_BYTES)
    try:
        join = JoinGroup(
            epoch=1,
            rank_offset=1,
            world_size=2,
            store_host="127.0.0.1",
            store_port=sender.port,
            backend="gloo",
            timeout_s=JOIN_TIMEOUT_S,
            secret=sender.epoch_secret(1),
        )
        joining = pool.submit(backend.join_group, join)
        sender.open_epoch(1, 2, JOIN_TIMEOUT_S)
        joining.result(timeout=JOIN_TIMEOUT_S)
        yield HFHarness(backend, sender, pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        backend.close()
        sender.close()


def model_state(backend: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backend.model.named_parameters()}


@pytest.mark.timeout(120)
def test_hf_backend_loads_bfloat16_weights_bucket_by_bucket_into_a_float32_model(
    hf: HFHarness, record_property: pytest.RecordProperty
) -> None:
    weights = tiny_policy(seed=1, dtype=torch.bfloat16)
    manifest, flats = build_manifest(1, weights, HF_BUCKET_BYTES)
    largest_bucket = max(b.nbytes for b in manifest.buckets)
    assert len(manifest.buckets) > 4 * MAX_LIVE_BUCKETS
    assert hf.publish(manifest, flats).result() == manifest.checksum
    assert hf.backend.version == 1 and hf.backend.poisoned is None

    state = model_state(hf.backend)
    for name, sent in weights.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], sent.float()), name
    peak = hf.backend._receiver.peak_buffer_bytes
    record_property("peak_receive_buffer_bytes", peak)
    record_property("publish_bytes", manifest.total_bytes)
    assert peak <= MAX_LIVE_BUCKETS * largest_bucket < manifest.total_bytes
    (completions,) = hf.backend.generate([SampleRequest([1, 5, 6], 2, 1.0, 4)])
    assert all(set(c.versions) == {1} for c in completions)


@pytest.mark.timeout(120)
def test_hf_checksum_mismatch_poisons_the_model_until_a_complete_publish(
    hf: HFHarness,
) -> None:
    weights = tiny_policy(seed=2, dtype=torch.float32)
    manifest, flats = build_manifest(1, weights, HF_BUCKET_BYTES)
    bad = dataclasses.replace(manifest, checksum="0" * 64)
    loading = hf.pool.submit(hf.backend.update_weights, bad, SEND_TIMEOUT_S)
    with pytest.raises(ChecksumMismatch):
        hf.sender.send(flats, SEND_TIMEOUT_S)
    with pytest.raises(ChecksumMismatch):
        loading.result(timeout=SEND_TIMEOUT_S)
    # The bytes were loaded before the mismatch could be known: the model is neither version.
    assert hf.backend.version == 0
    assert hf.backend.poisoned is not None
    with pytest.raises(RuntimeError, match="unusable"):
        hf.backend.generate([SampleRequest([1, 5, 6], 1, 1.0, 2)])

    # The group survived; a complete publish replaces every parameter and sampling resumes.
    manifest, flats = build_manifest(2, weights, HF_BUCKET_BYTES)
    assert hf.publish(manifest, flats).result() == manifest.checksum
    assert hf.backend.version == 2 and hf.backend.poisoned is None
    (completions,) = hf.backend.generate([SampleRequest([1, 5, 6], 1, 1.0, 2)])
    assert set(completions[0].versions) == {2}


@pytest.mark.timeout(120)
def test_hf_publish_that_does_not_fit_is_drained_and_loads_nothing(hf: HFHarness) -> None:
    before = model_state(hf.backend)
    weights = tiny_policy(seed=3, dtype=torch.float32)
    weights["model.layers.9.mlp.up_proj.weight"] = torch.zeros(4, 4)
    manifest, flats = build_manifest(1, weights, HF_BUCKET_BYTES)
    loading = hf.publish(manifest, flats)  # the send completes: the member drained it
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        loading.result()
    assert hf.backend.version == 0 and hf.backend.poisoned is None
    after = model_state(hf.backend)
    assert all(torch.equal(before[n], after[n]) for n in before)

    del weights["model.layers.9.mlp.up_proj.weight"]
    manifest, flats = build_manifest(2, weights, HF_BUCKET_BYTES)
    assert hf.publish(manifest, flats).result() == manifest.checksum
    assert hf.backend.version == 2

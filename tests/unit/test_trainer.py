"""The learner's step on the tiny model: micro-batching changes nothing, the update moves the
policy, and stale-rollout corrections are applied per token."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpreg_core.config import LearnerConfig
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.trainer import Trainer, build_batch

MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"


def make_groups(model: torch.nn.Module, seed: int = 0) -> list[rollout_pb2.RolloutGroup]:
    """Groups of completions sampled from the model itself (plausible tokens, so some are kept
    by the min-p proxy), with rewards mixed inside each group."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.manual_seed(seed)
    groups = []
    for g, prompt in enumerate(["12+7=", "45-13=", "9+88="]):
        ids = tok(prompt)["input_ids"]
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=True, num_return_sequences=4,
            max_new_tokens=5, top_k=0, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        group = rollout_pb2.RolloutGroup(task_id=f"t{g}", prompt_token_ids=ids)
        for i, row in enumerate(out[:, len(ids) :].tolist()):
            toks = [t for t in row if t != tok.pad_token_id] or [tok.eos_token_id]
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=toks,
                    logprobs=[-1.5] * len(toks),
                    versions=[0] * len(toks),
                    reward=float((i + g) % 2),
                )
            )
        groups.append(group)
    return groups


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64)


def run_step(base: torch.nn.Module, micro: int, **overrides: object) -> tuple[dict, dict]:
    model = copy.deepcopy(base)
    settings = {"micro_batch_sequences": micro, "optimizer": {"lr": 1e-3}, "max_staleness": 0}
    config = LearnerConfig.model_validate({**settings, **overrides})
    trainer = Trainer(model, config)
    stats = trainer.step(build_batch(make_groups(model), "std"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return stats, grads


@pytest.mark.parametrize(
    "loss", [{"type": "lp_reg", "rho_neg": 0.3, "kappa": 1e-3}, {"type": "grpo"}]
)
def test_micro_batching_gives_the_same_step(base_model: torch.nn.Module, loss: dict) -> None:
    one, g1 = run_step(base_model, 12, loss=loss)
    for micro in (5,):
        many, gm = run_step(base_model, micro, loss=loss)
        for key in ("loss", "loss_pg", "loss_kl", "pg_clipfrac", "entropy", "num_regularized"):
            assert many[key] == pytest.approx(one[key], abs=1e-10), key
        for name, grad in g1.items():
            torch.testing.assert_close(gm[name], grad, atol=1e-10, rtol=1e-8)


def test_step_regularises_and_updates_weights(base_model: torch.nn.Module) -> None:
    model = copy.deepcopy(base_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A tiny kappa keeps (nearly) every token in the proxy, so low-probability candidates sit
    # below it and are regularised.
    # Synchronous (no off-policy correction): the fake behaviour log-probs would mask tokens.
    config = LearnerConfig.model_validate(
        {"max_staleness": 0, "loss": {"rho_neg": 0.3, "kappa": 1e-3}}
    )
    trainer = Trainer(model, config)
    stats = trainer.step(build_batch(make_groups(model), "std"))
    assert stats["num_candidates"] >= stats["num_regularized"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_truncated_importance_weights_change_the_gradient(base_model: torch.nn.Module) -> None:
    _, plain = run_step(base_model, 12, loss={"type": "grpo"})
    _, tis = run_step(base_model, 12, loss={"type": "grpo"}, off_policy={"type": "tis", "cap": 2.0})
    assert any(not torch.allclose(plain[n], tis[n]) for n in plain)


def test_bf16_compute_keeps_fp32_master_weights_that_move_at_small_learning_rates() -> None:
    """Half-precision weights round away updates far below their precision (bf16 has 8 bits of
    mantissa: at lr 1e-6 almost no weight would change); fp32 masters under bf16 autocast do."""
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    config = LearnerConfig.model_validate({"optimizer": {"lr": 1e-6, "warmup_steps": 0}})
    trainer = Trainer(model, config, device=torch.device("cpu"), compute_dtype=torch.bfloat16)
    groups = make_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = trainer.step(build_batch(groups, "std"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = trainer.optimizer.state[next(iter(model.parameters()))]
    assert state["exp_avg"].dtype == torch.float32
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert changed / total > 0.5, f"only {changed} of {total} weights moved"
    assert torch.isfinite(torch.tensor(stats["loss"]))
    # The statistics came from bf16 matmuls, so they differ slightly from an fp32 recompute.
    assert abs(stats["entropy"]) > 0


def test_half_precision_master_weights_are_refused() -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model.dtype"):
        Trainer(model, LearnerConfig())


def test_several_updates_per_step_make_the_ratio_and_clip_act(base_model: torch.nn.Module) -> None:
    """One update per step: the ratio against the step-start policy is exactly 1 and the clip
    never acts. Several mini-batch updates over the same batch move the policy between them."""
    loss = {"type": "grpo", "clip_low": 0.01, "clip_high": 0.01}
    one, _ = run_step(base_model, 12, loss=loss, optimizer={"lr": 5e-2})
    assert one["num_updates"] == 1
    assert one["ppo_kl"] == pytest.approx(0.0, abs=1e-12)
    assert one["pg_clipfrac"] == 0.0
    many, _ = run_step(
        base_model, 12, loss=loss, optimizer={"lr": 5e-2}, updates_per_step=4, update_epochs=2
    )
    assert many["num_updates"] == 4
    assert many["pg_clipfrac"] > 0.0
    assert many["ppo_kl"] != pytest.approx(0.0, abs=1e-12)


def test_decoupled_correction_is_the_default_off_policy(base_model: torch.nn.Module) -> None:
    assert LearnerConfig().off_policy_type == "decoupled"
    assert LearnerConfig(max_staleness=0).off_policy_type == "none"
    stats, _ = run_step(base_model, 12, loss={"type": "grpo"}, max_staleness=2)
    # The fake behaviour log-probs (-1.5 everywhere) give real importance weights.
    assert stats["iw_max"] > stats["iw_mean"] > 0
    assert 0.0 <= stats["iw_masked_frac"] <= 1.0

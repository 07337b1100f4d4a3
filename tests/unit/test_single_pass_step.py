"""A one-update step takes its statistics from its own forward with grad: for every loss and
off-policy correction it gives the step of the two-pass path (a no-grad statistics pass first),
metrics, gradients and parameters alike (float64, the tiny model).

Qwen2's RMSNorm computes in float32 whatever the model's dtype, so float32 rounding sits inside
a float64 model's backward: a gradient accumulated in another order (the regularised tokens'
pass, a denominator known only after the forwards) then differs from the two-pass one at 1e-7.
The exactness tests swap in the same norm computed in the input's dtype (float64 throughout,
agreement to 1e-10); one test keeps the stock norm, agreeing to float32 rounding."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from test_trainer import MODEL, make_groups
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from lpreg_core.config import LearnerConfig
from services.learner.trainer import StepBatch, Trainer, build_batch

LP_REG = {"type": "lp_reg", "rho_neg": 0.5, "kappa": 1e-3}
LOSSES: dict[str, dict[str, Any]] = {
    "lp_reg": LP_REG,
    "lp_reg_seq_mean": {**LP_REG, "loss_agg_mode": "seq-mean-token-mean"},
    "lp_reg_micro_batch_ranking": {**LP_REG, "ranking": "micro_batch"},
    "lp_reg_with_positive_branch": {**LP_REG, "rho_pos": 0.5},
    "grpo": {"type": "grpo"},
    "clip_higher": {"type": "clip_higher"},
    "entropy_bonus": {"type": "entropy_bonus", "entropy_coef": 0.1},
}
OFF_POLICY = ["none", "tis", "decoupled"]


class InputDtypeRMSNorm(Qwen2RMSNorm):
    """Qwen2's RMSNorm in the input's dtype (the stock one computes in float32)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def stock() -> tuple[torch.nn.Module, StepBatch]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64)
    return model, build_batch(make_groups(model), "std")


@pytest.fixture(scope="module")
def base(stock: tuple[torch.nn.Module, StepBatch]) -> tuple[torch.nn.Module, StepBatch]:
    """The tiny model computing in float64 throughout."""
    model = copy.deepcopy(stock[0])
    norms = [m for m in model.modules() if isinstance(m, Qwen2RMSNorm)]
    assert norms
    for norm in norms:
        norm.__class__ = InputDtypeRMSNorm
    return model, stock[1]


class CountingForwards:
    """Wraps a trainer's statistics forward and counts its calls, with and without grad."""

    def __init__(self, trainer: Trainer) -> None:
        self.inner, self.with_grad, self.without_grad = trainer.forward_stats, 0, 0
        trainer.forward_stats = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.inner(*args, **kwargs)


def run_step(
    base: tuple[torch.nn.Module, StepBatch], single_pass: bool, **learner: Any
) -> tuple[dict[str, float], torch.nn.Module, CountingForwards]:
    model = copy.deepcopy(base[0])
    settings = {"micro_batch_sequences": 5, "optimizer": {"lr": 1e-3}, "max_staleness": 1}
    trainer = Trainer(model, LearnerConfig.model_validate({**settings, **learner}))
    trainer.single_pass = single_pass
    forwards = CountingForwards(trainer)
    stats = trainer.step(base[1])
    return stats, model, forwards


def assert_same_step(
    one: tuple[dict[str, float], torch.nn.Module],
    two: tuple[dict[str, float], torch.nn.Module],
    rel: float = 1e-10,
    parameters: bool = True,
) -> None:
    (stats1, model1), (stats2, model2) = one, two
    assert sorted(stats1) == sorted(stats2)
    for key, value in stats2.items():
        assert stats1[key] == pytest.approx(value, rel=rel, abs=1e-12), key
    for (name, p1), p2 in zip(model1.named_parameters(), model2.parameters(), strict=True):
        assert p1.grad is not None and p2.grad is not None, name
        scale = float(p2.grad.abs().max())
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rel, atol=rel * scale, msg=name)
        if parameters:
            torch.testing.assert_close(p1.detach(), p2.detach(), rtol=rel, atol=1e-13, msg=name)


@pytest.mark.parametrize("off_policy", OFF_POLICY)
@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
def test_one_update_step_in_one_pass_equals_two_passes(
    base: tuple[torch.nn.Module, StepBatch], loss: str, off_policy: str
) -> None:
    learner = {"loss": LOSSES[loss], "off_policy": {"type": off_policy, "cap": 3.0}}
    single, model1, forwards = run_step(base, True, **learner)
    double, model2, _ = run_step(base, False, **learner)
    assert_same_step((single, model1), (double, model2))
    # No statistics pass: one forward with grad per micro-batch (3: 12 sequences, 5 at a time),
    # plus, when the step-wide ranking regularised tokens, one per 5 sequences that hold them.
    assert forwards.without_grad == 0
    pulled = LOSSES[loss]["type"] == "lp_reg" and "ranking" not in LOSSES[loss]
    most = math.ceil(min(single["num_regularized"], 12) / 5) if pulled else 0
    assert 3 + min(most, 1) <= forwards.with_grad <= 3 + most
    if pulled:
        assert single["num_regularized"] > 0  # the regularised tokens' pass ran
    if off_policy != "none":
        # The fake behaviour log-probs (-1.5) give real weights, and decoupled masks some.
        assert single["iw_max"] > single["iw_mean"] > 0
    if off_policy == "decoupled":
        assert single["iw_masked_frac"] > 0


def test_several_updates_reuse_the_step_start_pass(base: tuple[torch.nn.Module, StepBatch]) -> None:
    learner = {"loss": LP_REG, "updates_per_step": 2, "off_policy": {"type": "decoupled"}}
    single, model1, forwards = run_step(base, True, **learner)
    double, model2, _ = run_step(base, False, **learner)
    assert_same_step((single, model1), (double, model2))
    # The step-start pass once (3 micro-batches), then each update's micro-batches (6 + 6
    # sequences, 2 each).
    assert (forwards.without_grad, forwards.with_grad) == (3, 4)


def test_stock_model_agrees_to_its_float32_rounding(
    stock: tuple[torch.nn.Module, StepBatch],
) -> None:
    learner = {"loss": LP_REG, "off_policy": {"type": "decoupled", "cap": 3.0}}
    single, model1, _ = run_step(stock, True, **learner)
    double, model2, _ = run_step(stock, False, **learner)
    assert single["num_regularized"] > 0 and single["iw_masked_frac"] > 0
    # Gradients to float32 rounding; not the parameters: Adam's first update is about
    # lr * sign(grad), which rounding flips where a gradient entry is itself rounding noise.
    assert_same_step((single, model1), (double, model2), rel=1e-5, parameters=False)

"""Properties of the Lp-Reg loss and its baselines: invariances, edge cases, hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from lpreg_core.loss import (
    ClipHigherConfig,
    EntropyBonusConfig,
    GRPOConfig,
    LossConfig,
    LpRegConfig,
    ProxyFilter,
    StepRanking,
    lp_reg_from_logits,
    policy_loss,
    select_regularized,
    token_stats_from_hidden,
)

F64 = torch.float64


def _step(
    seed: int, batch: int = 8, length: int = 12, dtype: torch.dtype = F64
) -> dict[str, torch.Tensor]:
    """A random optimiser step: ragged sequences, per-sequence advantages, some filtered tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    old = -(torch.rand(batch, length, generator=g, dtype=F64) * 4.0 + 0.05)
    log_probs = old + 0.3 * torch.randn(batch, length, generator=g, dtype=F64)
    kept = torch.rand(batch, length, generator=g) > 0.2
    proxy = torch.where(kept, old + 0.6 * torch.rand(batch, length, generator=g, dtype=F64), -1e4)
    advantages = torch.randn(batch, 1, generator=g, dtype=F64) * mask
    return {
        "log_probs": log_probs.to(dtype),
        "old_log_probs": old.to(dtype),
        "proxy_log_probs": proxy.to(dtype),
        "advantages": advantages.to(dtype),
        "mask": mask,
    }


def _num_tokens(step: dict[str, torch.Tensor], loss_agg_mode: str) -> float:
    if loss_agg_mode == "token-mean":
        return float(step["mask"].sum())
    return float(step["mask"].shape[0])


# ---------------------------------------------------------------------------------------------
# Micro-batch invariance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(
    loss_agg_mode: str, with_weights: bool
) -> None:
    step = _step(0, batch=8, length=16)
    cfg = LpRegConfig(
        rho_neg=0.3, rho_pos=0.2, clip_low=0.2, clip_high=0.28, loss_agg_mode=loss_agg_mode
    )
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(step["mask"].shape, generator=g, dtype=F64) + 0.5 if with_weights else None
    _, reg = select_regularized(
        step["log_probs"],
        step["proxy_log_probs"],
        step["advantages"],
        step["mask"],
        rho_neg=cfg.rho_neg,
        rho_pos=cfg.rho_pos,
    )
    assert int(reg.sum()) >= 3, "the step must exercise the regularised branch"
    num_tokens = _num_tokens(step, loss_agg_mode)

    results = []
    for num_micro in (1, 2, 4):
        log_probs = step["log_probs"].clone().requires_grad_()
        total = torch.zeros((), dtype=F64)
        summed: dict[str, torch.Tensor] = {}
        for rows in torch.arange(8).chunk(num_micro):
            loss, metrics = policy_loss(
                log_probs[rows],
                step["old_log_probs"][rows],
                step["proxy_log_probs"][rows],
                step["advantages"][rows],
                step["mask"][rows],
                config=cfg,
                num_tokens=num_tokens,
                reg_mask=reg[rows],
                behaviour_weights=None if weights is None else weights[rows],
            )
            total = total + loss
            for key, value in metrics.items():
                summed[key] = summed.get(key, torch.zeros((), dtype=value.dtype)) + value
        total.backward()
        assert log_probs.grad is not None
        results.append((total.detach(), log_probs.grad.clone(), summed))

    base_loss, base_grad, base_metrics = results[0]
    assert float(base_metrics["pg_clipfrac"]) > 0, "the step must exercise the clip"
    for loss, grad, metrics in results[1:]:
        torch.testing.assert_close(loss, base_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, base_grad, rtol=0, atol=1e-12)
        for key in base_metrics:
            torch.testing.assert_close(metrics[key], base_metrics[key], rtol=0, atol=1e-12)
    assert int(base_metrics["num_regularized"]) == int(reg.sum())


def test_micro_batch_ranking_depends_on_packing_and_step_ranking_does_not() -> None:
    """Reference trap: bottom-k per micro-batch selects different tokens than over the step."""
    step = _step(3, batch=8, length=16)
    cfg = LpRegConfig(rho_neg=0.2, clip_low=1.0, clip_high=9.0, ranking="micro_batch")
    whole_cand, _ = select_regularized(
        step["log_probs"],
        step["proxy_log_probs"],
        step["advantages"],
        step["mask"],
        rho_neg=0.2,
        rho_pos=0.0,
    )
    halves = [
        select_regularized(
            step["log_probs"][rows],
            step["proxy_log_probs"][rows],
            step["advantages"][rows],
            step["mask"][rows],
            rho_neg=cfg.rho_neg,
            rho_pos=cfg.rho_pos,
        )[0]
        for rows in torch.arange(8).chunk(2)
    ]
    assert not torch.equal(torch.cat(halves), whole_cand)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [LpRegConfig(rho_neg=0.5, rho_pos=0.5), GRPOConfig(), ClipHigherConfig(), EntropyBonusConfig()],
    ids=lambda c: c.type,
)
@pytest.mark.parametrize("num_tokens", [0.0, 7.0])
def test_all_masked_gives_zero_loss_and_finite_gradients(
    cfg: LossConfig, num_tokens: float
) -> None:
    shape = (3, 5)
    garbage = torch.full(shape, float("nan"), dtype=F64)
    log_probs = torch.full(shape, -float("inf"), dtype=F64).requires_grad_()
    entropy = torch.full(shape, float("inf"), dtype=F64).requires_grad_()
    loss, metrics = policy_loss(
        log_probs,
        garbage,
        garbage,
        garbage,
        torch.zeros(shape, dtype=torch.long),
        config=cfg,
        num_tokens=num_tokens,
        entropy=entropy,
        behaviour_weights=garbage,
    )
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert log_probs.grad is not None
    assert torch.equal(log_probs.grad, torch.zeros(shape, dtype=F64))
    if isinstance(cfg, EntropyBonusConfig):
        assert entropy.grad is not None
        assert torch.equal(entropy.grad, torch.zeros(shape, dtype=F64))
    for key, value in metrics.items():
        assert float(value) == 0.0, key


def test_all_masked_logits_path_gives_zero_loss_and_zero_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, generator=g, dtype=F64).requires_grad_()
    out = lp_reg_from_logits(
        logits,
        torch.randn(2, 4, 9, generator=g, dtype=F64),
        torch.randint(0, 9, (2, 4), generator=g),
        torch.zeros(2, 4, dtype=F64),
        torch.zeros(2, 4, dtype=torch.long),
        LpRegConfig(rho_neg=0.5),
    )
    out["loss"].backward()
    assert float(out["loss"].detach()) == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    assert float(out["entropy_token_mean"]) == 0.0 and float(out["entropy_seq_mean"]) == 0.0


@pytest.mark.parametrize(("num_negative", "expected_candidates"), [(199, 0), (200, 2), (350, 3)])
def test_k_must_exceed_one(num_negative: int, expected_candidates: int) -> None:
    """k = int(n * rho): with rho = 1 % a step needs >= 200 negative tokens before anything happens."""
    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(num_negative, generator=g, dtype=F64) * 5.0
    proxy = torch.zeros(num_negative, dtype=F64)  # every candidate passes log_prob < proxy
    advantages = -torch.ones(num_negative, dtype=F64)
    mask = torch.ones(num_negative, dtype=torch.bool)
    cand, reg = select_regularized(log_probs, proxy, advantages, mask, rho_neg=0.01, rho_pos=0.0)
    assert int(cand.sum()) == expected_candidates
    assert torch.equal(cand, reg)
    if expected_candidates:
        assert torch.equal(
            cand.nonzero().squeeze(-1),
            torch.sort(log_probs).indices[:expected_candidates].sort().values,
        )

    cfg = LpRegConfig(rho_neg=0.01)
    loss, metrics = policy_loss(
        log_probs,
        log_probs,
        proxy,
        advantages,
        mask,
        config=cfg,
        num_tokens=float(num_negative),
    )
    assert int(metrics["num_regularized"]) == expected_candidates
    assert int(metrics["num_candidates"]) == expected_candidates
    if not expected_candidates:
        # On-policy, ratio 1 and A = -1: the loss is exactly the surrogate 1.
        torch.testing.assert_close(loss, torch.tensor(1.0, dtype=F64))


def test_beta_zero_equals_grpo_when_regularised_ratios_are_inside_the_clip() -> None:
    step = _step(5, batch=8, length=16)
    lp_cfg = LpRegConfig(beta=0.0, rho_neg=0.4, rho_pos=0.3, clip_low=1.0, clip_high=9.0)
    grpo_cfg = GRPOConfig(clip_low=1.0, clip_high=9.0)
    num_tokens = _num_tokens(step, "token-mean")
    grads = []
    losses = []
    for cfg in (lp_cfg, grpo_cfg):
        log_probs = step["log_probs"].clone().requires_grad_()
        loss, metrics = policy_loss(
            log_probs,
            step["old_log_probs"],
            step["proxy_log_probs"] if cfg is lp_cfg else None,
            step["advantages"],
            step["mask"],
            config=cfg,
            num_tokens=num_tokens,
        )
        if cfg is lp_cfg:
            assert int(metrics["num_regularized"]) > 0
        loss.backward()
        losses.append(loss.detach())
        grads.append(log_probs.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


def test_beta_zero_still_drops_the_clip_on_regularised_tokens() -> None:
    """As in the reference, R gets -A r unclipped whatever beta is: beta = 0 is GRPO only in-range."""
    log_probs = torch.tensor([-3.0, -0.5, -0.4], dtype=F64)
    old = torch.tensor([-2.0, -0.5, -0.4], dtype=F64)  # ratio of token 0 = e^-1 < 1 - 0.2
    proxy = torch.tensor([-1.0, -1.0, -1.0], dtype=F64)
    adv = -torch.ones(3, dtype=F64)
    mask = torch.ones(3, dtype=torch.bool)
    reg = torch.tensor([True, False, False])
    lp, _ = policy_loss(
        log_probs,
        old,
        proxy,
        adv,
        mask,
        config=LpRegConfig(beta=0.0, clip_low=0.2, clip_high=0.2),
        num_tokens=3.0,
        reg_mask=reg,
    )
    grpo, _ = policy_loss(log_probs, old, None, adv, mask, config=GRPOConfig(), num_tokens=3.0)
    torch.testing.assert_close(grpo - lp, torch.tensor((0.8 - math.exp(-1.0)) / 3.0, dtype=F64))


def test_kl_term_pushes_regularised_log_probs_up() -> None:
    step = _step(7, batch=8, length=16)
    cfg = LpRegConfig(rho_neg=0.4, rho_pos=0.3, beta=1.0, clip_low=0.2, clip_high=0.28)
    num_tokens = _num_tokens(step, "token-mean")
    _, reg = select_regularized(
        step["log_probs"],
        step["proxy_log_probs"],
        step["advantages"],
        step["mask"],
        rho_neg=0.4,
        rho_pos=0.3,
    )
    grads = {}
    for beta in (1.0, 0.0):
        log_probs = step["log_probs"].clone().requires_grad_()
        loss, _ = policy_loss(
            log_probs,
            step["old_log_probs"],
            step["proxy_log_probs"],
            step["advantages"],
            step["mask"],
            config=cfg.model_copy(update={"beta": beta}),
            num_tokens=num_tokens,
            reg_mask=reg,
        )
        loss.backward()
        grads[beta] = log_probs.grad
    kl_grad = grads[1.0] - grads[0.0]
    assert int(reg.sum()) >= 3
    # Gradient descent on the loss raises log pi_theta on every regularised token ...
    assert bool((kl_grad[reg] < 0).all())
    # ... by exactly beta * (exp(D) - 1) / num_tokens (D < 2.6 here, so the clamp is inactive).
    delta = (step["proxy_log_probs"] - step["log_probs"])[reg]
    torch.testing.assert_close(kl_grad[reg], -(delta.exp() - 1.0) / num_tokens)
    assert bool((kl_grad[~reg] == 0).all())


def test_hand_computed_tiny_case() -> None:
    """One sequence, four tokens, A = -1, rho_neg = 0.5 -> k = 2 candidates, one regularised."""
    log_probs = torch.tensor([-0.5, -3.0, -2.0, -0.1], dtype=F64, requires_grad=True)
    old = torch.tensor([-0.6, -2.5, -2.2, -0.1], dtype=F64)
    proxy = torch.tensor([-0.4, -2.0, -1e4, -0.05], dtype=F64)
    adv = torch.full((4,), -1.0, dtype=F64)
    mask = torch.ones(4, dtype=torch.long)
    cfg = LpRegConfig(rho_neg=0.5, clip_low=0.2, clip_high=0.28, beta=1.0)
    loss, metrics = policy_loss(log_probs, old, proxy, adv, mask, config=cfg, num_tokens=4.0)
    loss.backward()

    # Candidates: the two lowest log-probs (tokens 1 and 2). Token 2 is filtered noise
    # (proxy -1e4), so only token 1 satisfies log p < log p_proxy.
    e = math.e
    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.2), 1.0]
    k3_token1 = e - 1.0 - 1.0  # D = -2.0 - (-3.0) = 1
    per_token = [
        r[0],
        r[1] + k3_token1,
        r[2],
        r[3],
    ]  # -A r = r; all other ratios are in [0.8, 1.28]
    assert float(loss.detach()) == pytest.approx(sum(per_token) / 4.0, abs=1e-14)
    assert float(metrics["loss_kl"]) == pytest.approx(k3_token1 / 4.0, abs=1e-14)
    assert int(metrics["num_candidates"]) == 2
    assert int(metrics["num_regularized"]) == 1
    # Token 1's surrogate is clipped (ratio 0.61 < 0.8): counted before the override.
    assert float(metrics["pg_clipfrac"]) == pytest.approx(0.25, abs=1e-14)
    k3_old = [math.exp(d) - d - 1.0 for d in (-0.1, 0.5, -0.2, 0.0)]
    assert float(metrics["ppo_kl"]) == pytest.approx(sum(k3_old) / 4.0, abs=1e-14)
    want_grad = torch.tensor([r[0], r[1] - (e - 1.0), r[2], r[3]], dtype=F64) / 4.0
    assert log_probs.grad is not None
    torch.testing.assert_close(log_probs.grad, want_grad, rtol=0, atol=1e-14)


def test_clip_higher_widens_only_the_upper_clip() -> None:
    log_probs = torch.log(torch.tensor([1.25, 0.75], dtype=F64))
    old = torch.zeros(2, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, dtype=torch.bool)
    grpo, _ = policy_loss(log_probs, old, None, adv, mask, config=GRPOConfig(), num_tokens=2.0)
    higher, _ = policy_loss(
        log_probs, old, None, adv, mask, config=ClipHigherConfig(), num_tokens=2.0
    )
    # A > 0, r = 1.25: GRPO keeps max(-1.25, -1.2) = -1.2; clip-higher (1.28) keeps -1.25.
    # A < 0, r = 0.75: both keep max(0.75, 0.8) = 0.8.
    assert float(grpo) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-14)
    assert float(higher) == pytest.approx((-1.25 + 0.8) / 2, abs=1e-14)


def test_entropy_bonus_subtracts_the_weighted_entropy() -> None:
    step = _step(2)
    entropy = torch.rand(step["mask"].shape, dtype=F64).requires_grad_()
    cfg = EntropyBonusConfig(entropy_coef=0.01)
    num_tokens = _num_tokens(step, "token-mean")
    args = (step["log_probs"], step["old_log_probs"], None, step["advantages"], step["mask"])
    loss, metrics = policy_loss(*args, config=cfg, num_tokens=num_tokens, entropy=entropy)
    base, _ = policy_loss(*args, config=GRPOConfig(), num_tokens=num_tokens)
    bonus = (entropy.detach() * step["mask"]).sum() * 0.01 / num_tokens
    torch.testing.assert_close(loss.detach(), base - bonus)
    torch.testing.assert_close(metrics["loss_entropy"], -bonus)
    loss.backward()
    assert entropy.grad is not None
    torch.testing.assert_close(entropy.grad, -0.01 * step["mask"].to(F64) / num_tokens)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(*args, config=cfg, num_tokens=num_tokens)


def test_lp_reg_requires_proxy() -> None:
    step = _step(0)
    with pytest.raises(ValueError, match="proxy"):
        policy_loss(
            step["log_probs"],
            step["old_log_probs"],
            None,
            step["advantages"],
            step["mask"],
            config=LpRegConfig(),
            num_tokens=1.0,
        )


def test_behaviour_weights_scale_each_token_and_carry_no_gradient() -> None:
    step = _step(4)
    weights = torch.rand(step["mask"].shape, dtype=F64).requires_grad_()
    cfg = LpRegConfig(rho_neg=0.4)
    args = (
        step["log_probs"],
        step["old_log_probs"],
        step["proxy_log_probs"],
        step["advantages"],
        step["mask"],
    )
    _, reg = select_regularized(
        step["log_probs"],
        step["proxy_log_probs"],
        step["advantages"],
        step["mask"],
        rho_neg=0.4,
        rho_pos=0.0,
    )
    weighted, _ = policy_loss(
        *args, config=cfg, num_tokens=10.0, reg_mask=reg, behaviour_weights=weights
    )
    assert not weighted.requires_grad
    ones, _ = policy_loss(
        *args, config=cfg, num_tokens=10.0, reg_mask=reg, behaviour_weights=torch.ones_like(weights)
    )
    plain, _ = policy_loss(*args, config=cfg, num_tokens=10.0, reg_mask=reg)
    torch.testing.assert_close(ones, plain, rtol=0, atol=1e-15)
    assert float((weighted - plain).abs()) > 1e-6


# ---------------------------------------------------------------------------------------------
# Numerical guards and precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_values_give_finite_gradients(dtype: torch.dtype) -> None:
    # Token 0: log ratio +60 with A > 0 (clipped branch wins, exp would overflow float32).
    # Token 1: regularised with D = 150 (k3 clamped at 10; exp(150) overflows float32).
    # Token 2: not selected but D = 120 (its k3 is computed and discarded).
    log_probs = torch.tensor([-1.0, -160.0, -130.0], dtype=dtype, requires_grad=True)
    old = torch.tensor([-61.0, -160.0, -130.0], dtype=dtype)
    proxy = torch.tensor([-1.0, -10.0, -10.0], dtype=dtype)
    adv = torch.tensor([1.0, -1.0, -1.0], dtype=dtype)
    mask = torch.ones(3, dtype=torch.bool)
    reg = torch.tensor([False, True, False])
    loss, metrics = policy_loss(
        log_probs, old, proxy, adv, mask, config=LpRegConfig(), num_tokens=3.0, reg_mask=reg
    )
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert log_probs.grad is not None and bool(torch.isfinite(log_probs.grad).all())
    assert float(log_probs.grad[1].float()) == pytest.approx(1.0 / 3.0, rel=1e-2)  # only -A r
    assert int(metrics["num_kl_clamped"]) == 1
    torch.testing.assert_close(metrics["loss_kl"], torch.tensor(10.0 / 3.0), rtol=1e-6, atol=0)


def test_low_precision_logits_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 40, generator=g) * 3
    old = logits + 0.2 * torch.randn(2, 6, 40, generator=g)
    tokens = torch.randint(0, 40, (2, 6), generator=g)
    adv = torch.randn(2, 1, generator=g).expand(2, 6).contiguous()
    mask = torch.ones(2, 6, dtype=torch.long)
    cfg = LpRegConfig(rho_neg=0.5)
    logits_bf16 = logits.to(torch.bfloat16).requires_grad_()
    out = lp_reg_from_logits(logits_bf16, old.to(torch.bfloat16), tokens, adv, mask, cfg)
    out["loss"].backward()
    ref = lp_reg_from_logits(
        logits.to(torch.bfloat16).float(), old.to(torch.bfloat16).float(), tokens, adv, mask, cfg
    )
    assert out["log_probs"].dtype == torch.float32
    assert logits_bf16.grad is not None and logits_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out["loss"].detach(), ref["loss"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["log_probs"].detach(), ref["log_probs"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Selection invariants
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    rho_neg=st.floats(0.0, 1.0),
    rho_pos=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_selection_is_bottom_k_per_branch(
    n: int, rho_neg: float, rho_pos: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(n, generator=g, dtype=F64) * 6.0
    proxy = -torch.rand(n, generator=g, dtype=F64) * 6.0
    adv = torch.randint(-1, 2, (n,), generator=g).to(F64)
    mask = torch.rand(n, generator=g) > 0.1
    cand, reg = select_regularized(log_probs, proxy, adv, mask, rho_neg=rho_neg, rho_pos=rho_pos)
    assert cand.dtype == torch.bool and cand.shape == (n,)
    assert torch.equal(reg, cand & (log_probs < proxy))
    assert not bool((cand & ~mask).any()) and not bool((cand & (adv == 0)).any())
    for sign, rho in ((1.0, rho_pos), (-1.0, rho_neg)):
        branch = mask & (adv == sign)
        size = int(branch.sum())
        k = max(1, int(size * rho))
        chosen = cand & branch
        if size == 0 or k <= 1:
            assert int(chosen.sum()) == 0
            continue
        assert int(chosen.sum()) == k
        if k < size:
            assert float(log_probs[chosen].max()) <= float(log_probs[branch & ~chosen].min())


def test_selection_keeps_any_shape_and_breaks_ties_by_position() -> None:
    log_probs = torch.full((2, 3, 4), -1.0, dtype=F64)
    adv = -torch.ones(2, 3, 4, dtype=F64)
    mask = torch.ones(2, 3, 4)
    cand, reg = select_regularized(log_probs, log_probs + 1, adv, mask, rho_neg=0.25, rho_pos=0.0)
    assert cand.shape == (2, 3, 4)
    assert cand.reshape(-1).nonzero().squeeze(-1).tolist() == list(range(6))
    assert torch.equal(cand, reg)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_loss_config_is_a_discriminated_union() -> None:
    adapter: TypeAdapter[LossConfig] = TypeAdapter(LossConfig)
    assert isinstance(adapter.validate_python({"type": "lp_reg"}), LpRegConfig)
    assert isinstance(adapter.validate_python({"type": "grpo"}), GRPOConfig)
    assert adapter.validate_python({"type": "clip_higher"}).clip_high == 0.28
    assert adapter.validate_python({"type": "entropy_bonus"}).entropy_coef == 0.001
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "lp_reg", "rho": 0.01})
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "ppo"})


@pytest.mark.parametrize(
    "bad",
    [
        {"rho_neg": 1.5},
        {"kappa": -0.1},
        {"clip_low": 1.5},
        {"temperature": 0.0},
        {"beta": -1.0},
        {"kl_clamp": 0.0},
        {"threshold_mode": "top_p"},
        {"ranking": "global"},
        {"loss_agg_mode": "seq-mean-token-sum"},
    ],
)
def test_lp_reg_config_rejects_out_of_range_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LpRegConfig(**bad)  # type: ignore[arg-type]


def test_defaults_are_the_paper_settings_and_every_field_is_documented() -> None:
    cfg = LpRegConfig()
    assert (cfg.kappa, cfg.threshold_mode, cfg.rho_neg, cfg.rho_pos) == (0.02, "minp", 0.01, 0.0)
    assert (cfg.beta, cfg.clip_low, cfg.clip_high, cfg.kl_clamp) == (1.0, 1.0, 9.0, 10.0)
    assert (cfg.temperature, cfg.loss_agg_mode, cfg.ranking) == (1.0, "token-mean", "step")
    for model in (LpRegConfig, GRPOConfig, ClipHigherConfig, EntropyBonusConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_each_variant_declares_the_token_statistics_it_needs() -> None:
    lp = LpRegConfig(kappa=0.03, threshold_mode="fixed", rho_neg=0.2, rho_pos=0.1)
    assert lp.needs_proxy and lp.proxy_filter == ProxyFilter(kappa=0.03, threshold_mode="fixed")
    assert lp.step_ranking == StepRanking(rho_neg=0.2, rho_pos=0.1)
    assert not lp.needs_entropy_grad
    # Ranked per micro-batch, the selection happens inside policy_loss: no step-wide ranking.
    assert LpRegConfig(ranking="micro_batch").step_ranking is None
    for baseline in (GRPOConfig(), ClipHigherConfig()):
        assert not baseline.needs_proxy and baseline.proxy_filter is None
        assert baseline.step_ranking is None and not baseline.needs_entropy_grad
    bonus = EntropyBonusConfig()
    assert bonus.needs_entropy_grad and not bonus.needs_proxy and bonus.step_ranking is None
    with pytest.raises(ValueError, match="threshold_mode"):
        ProxyFilter(kappa=0.02, threshold_mode="top_p")  # type: ignore[arg-type]


def test_a_loss_without_proxy_gets_no_proxy_statistics() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=F64)
    tokens = torch.randint(0, 11, (5,), generator=g)
    bare = token_stats_from_hidden(
        hidden, weight, tokens, temperature=0.7, proxy=GRPOConfig(temperature=0.7).proxy_filter
    )
    assert bare.proxy_log_probs is None and bare.proxy_keep_count is None
    full = token_stats_from_hidden(
        hidden, weight, tokens, temperature=0.7, proxy=LpRegConfig().proxy_filter
    )
    assert full.proxy_log_probs is not None and full.proxy_keep_count is not None
    # Skipping the proxy changes nothing else, bit for bit.
    assert torch.equal(bare.log_probs, full.log_probs) and torch.equal(bare.entropy, full.entropy)
    (bare.log_probs.sum() + bare.entropy.sum()).backward()
    assert hidden.grad is not None and bool(torch.isfinite(hidden.grad).all())

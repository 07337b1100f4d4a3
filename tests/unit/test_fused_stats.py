"""token_stats_from_hidden (chunked, recomputing backward) against the full-logits path."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lpreg_core.loss import (
    TOKEN_MEAN_EPS,
    LpRegConfig,
    ProxyFilter,
    lp_reg_from_logits,
    policy_loss,
    proxy_log_probs_from_logits,
    select_regularized,
    token_stats_from_hidden,
)

F64 = torch.float64
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
ENTROPY_WEIGHT = 0.05


def _problem(
    dtype: torch.dtype,
    seed: int = 0,
    batch: int = 3,
    length: int = 11,
    hidden: int = 24,
    vocab: int = 97,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g, dtype=F64) * 0.5
    hidden_cur = torch.randn(batch, length, hidden, generator=g, dtype=F64)
    # The old policy differs in both hidden states and head, so the step is off-policy.
    hidden_old = hidden_cur + 0.1 * torch.randn(batch, length, hidden, generator=g, dtype=F64)
    weight_old = weight + 0.05 * torch.randn(vocab, hidden, generator=g, dtype=F64)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    # Tokens sampled from the old policy, as a rollout would be (uniform ids would be mostly noise).
    old_probs = torch.softmax(hidden_old @ weight_old.t(), dim=-1).reshape(-1, vocab)
    tokens = torch.multinomial(old_probs, 1, generator=g).reshape(batch, length)
    return {
        "weight": weight.to(dtype),
        "hidden": hidden_cur.to(dtype),
        "weight_old": weight_old.to(dtype),
        "hidden_old": hidden_old.to(dtype),
        "tokens": tokens,
        "advantages": torch.randn(batch, 1, generator=g, dtype=F64).to(dtype) * mask,
        "mask": mask,
    }


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, name: str) -> None:
    err = (got.detach().double() - want.detach().double()).abs().max()
    assert float(err) <= atol, f"{name}: max abs error {float(err):.3e} > {atol}"


def _assert_proxy_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Kept tokens absolutely; filtered ones (about -1e4, float32 spacing 1e-3) relatively."""
    kept = want > -1e3
    _assert_close(got[kept], want[kept], atol, "proxy_log_probs (kept)")
    if bool(kept.all()):
        return
    rel = ((got[~kept].double() - want[~kept].double()) / want[~kept].double()).abs()
    limit = 1e-6 if got.dtype == torch.float32 else atol
    assert float(rel.max()) <= limit, (
        f"proxy_log_probs (filtered): rel error {float(rel.max()):.3e}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("temperature", "threshold_mode", "kappa"),
    [(1.0, "minp", 0.02), (0.7, "minp", 0.1), (1.0, "fixed", 0.01), (1.3, "fixed", 0.005)],
)
def test_fused_equals_full_logits_lp_reg(
    dtype: torch.dtype, temperature: float, threshold_mode: str, kappa: float
) -> None:
    prob = _problem(dtype)
    atol = TOLERANCE[dtype]
    cfg = LpRegConfig(
        kappa=kappa,
        threshold_mode=threshold_mode,  # type: ignore[arg-type]
        rho_neg=0.3,
        rho_pos=0.2,
        clip_low=0.2,
        clip_high=0.28,
        temperature=temperature,
        ranking="micro_batch",
    )
    mask = prob["mask"]
    count = float(mask.sum())

    # Reference: full logits through lp_reg_from_logits.
    hidden_ref = prob["hidden"].clone().requires_grad_()
    weight_ref = prob["weight"].clone().requires_grad_()
    old_logits = prob["hidden_old"] @ prob["weight_old"].t()
    ref = lp_reg_from_logits(
        hidden_ref @ weight_ref.t(), old_logits, prob["tokens"], prob["advantages"], mask, cfg
    )
    ref_total = ref["loss"] + ENTROPY_WEIGHT * (ref["entropy"] * mask).sum() / count
    ref_total.backward()

    # Fused: the old pass (no grad) provides old log-probs and the proxy.
    hidden = prob["hidden"].clone().requires_grad_()
    weight = prob["weight"].clone().requires_grad_()
    kwargs: dict[str, Any] = {
        "temperature": temperature,
        "proxy": ProxyFilter(kappa, threshold_mode),  # type: ignore[arg-type]
        "chunk_size": 7,
    }
    with torch.no_grad():
        old = token_stats_from_hidden(
            prob["hidden_old"], prob["weight_old"], prob["tokens"], **kwargs
        )
    cur = token_stats_from_hidden(hidden, weight, prob["tokens"], **kwargs)
    loss, metrics = policy_loss(
        cur.log_probs,
        old.log_probs,
        old.proxy_log_probs,
        prob["advantages"],
        mask,
        config=cfg,
        num_tokens=count + TOKEN_MEAN_EPS,
    )
    total = loss + ENTROPY_WEIGHT * (cur.entropy * mask).sum() / count
    total.backward()

    assert int(metrics["num_regularized"]) > 0, "the case must exercise the regulariser"
    assert int(metrics["num_regularized"]) == int(ref["num_regularized"])
    _assert_close(cur.log_probs, ref["log_probs"], atol, "log_probs")
    _assert_close(cur.entropy, ref["entropy"], atol, "entropy")
    _assert_close(old.log_probs, ref["old_log_probs"], atol, "old_log_probs")
    _assert_proxy_close(old.proxy_log_probs, ref["proxy_log_probs"], atol)
    assert torch.equal(old.proxy_keep_count, ref["proxy_keep_count"])
    _assert_close(total, ref_total, atol, "loss")
    assert hidden.grad is not None and weight.grad is not None
    assert hidden_ref.grad is not None and weight_ref.grad is not None
    _assert_close(hidden.grad, hidden_ref.grad, atol, "grad hidden")
    _assert_close(weight.grad, weight_ref.grad, atol, "grad weight")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_match_plain_autograd(temperature: float) -> None:
    """Independent of lpreg's arithmetic: torch.log_softmax and Categorical entropy."""
    prob = _problem(F64, seed=1)
    tokens = prob["tokens"]
    g = torch.Generator().manual_seed(2)
    w_lp = torch.randn(tokens.shape, generator=g, dtype=F64)
    w_ent = torch.randn(tokens.shape, generator=g, dtype=F64)

    hidden = prob["hidden"].clone().requires_grad_()
    weight = prob["weight"].clone().requires_grad_()
    stats = token_stats_from_hidden(
        hidden, weight, tokens, temperature=temperature, proxy=ProxyFilter(0.02), chunk_size=4
    )
    ((stats.log_probs * w_lp).sum() + (stats.entropy * w_ent).sum()).backward()

    hidden_ref = prob["hidden"].clone().requires_grad_()
    weight_ref = prob["weight"].clone().requires_grad_()
    scaled = (hidden_ref @ weight_ref.t()) / temperature
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=scaled).entropy()
    ((log_probs * w_lp).sum() + (entropy * w_ent).sum()).backward()

    _assert_close(stats.log_probs, log_probs, 1e-12, "log_probs")
    _assert_close(stats.entropy, entropy, 1e-12, "entropy")
    assert hidden.grad is not None and weight.grad is not None
    assert hidden_ref.grad is not None and weight_ref.grad is not None
    _assert_close(hidden.grad, hidden_ref.grad, 1e-12, "grad hidden")
    _assert_close(weight.grad, weight_ref.grad, 1e-12, "grad weight")


def test_proxy_matches_the_reference_recipe() -> None:
    """softmax at T=1, keep p >= kappa * max p, filtered logits := -1e4, / T, log-softmax."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 50, generator=g, dtype=F64) * 3
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    for mode, kappa, temperature in (
        ("minp", 0.02, 1.0),
        ("minp", 0.3, 0.5),
        ("fixed", 0.05, 2.0),
        ("fixed", 0.99, 1.0),
    ):
        probs = torch.softmax(logits, dim=-1)
        threshold = kappa * probs.amax(dim=-1, keepdim=True) if mode == "minp" else kappa
        filtered = logits.masked_fill(probs < threshold, -1e4) / temperature
        want = torch.log_softmax(filtered, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        got, keep_count = proxy_log_probs_from_logits(
            logits,
            tokens,
            kappa=kappa,
            threshold_mode=mode,
            temperature=temperature,  # type: ignore[arg-type]
        )
        _assert_close(got, want, 1e-10, f"proxy {mode} {kappa} {temperature}")
        assert torch.equal(keep_count, (probs >= threshold).sum(dim=-1))
    # kappa = 0.99 in fixed mode keeps nothing: every token is "noise", the proxy is uniform.
    assert bool((keep_count == 0).all())
    torch.testing.assert_close(got, torch.full_like(got, -torch.log(torch.tensor(50.0, dtype=F64))))


@pytest.mark.parametrize("chunk_size", [1, 5, 33, 1000])
def test_chunk_size_does_not_change_results(chunk_size: int) -> None:
    prob = _problem(F64, seed=4)
    outs = []
    for size in (chunk_size, 10_000):
        hidden = prob["hidden"].clone().requires_grad_()
        weight = prob["weight"].clone().requires_grad_()
        stats = token_stats_from_hidden(
            hidden,
            weight,
            prob["tokens"],
            temperature=1.0,
            proxy=ProxyFilter(0.02),
            chunk_size=size,
        )
        (stats.log_probs.sum() + stats.entropy.sum()).backward()
        outs.append((stats, hidden.grad, weight.grad))
    (a, ha, wa), (b, hb, wb) = outs
    for name in ("log_probs", "entropy", "proxy_log_probs", "proxy_keep_count"):
        _assert_close(getattr(a, name), getattr(b, name), 1e-12, name)
    assert ha is not None and hb is not None and wa is not None and wb is not None
    _assert_close(ha, hb, 1e-12, "grad hidden")
    _assert_close(wa, wb, 1e-12, "grad weight")


def test_backward_saves_no_vocabulary_sized_tensor() -> None:
    """Only hidden, weight, tokens and (N,) vectors are kept for backward; logits are recomputed."""
    num_tokens, hidden_size, vocab = 64, 8, 50
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(num_tokens, hidden_size, generator=g).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g).requires_grad_()
    tokens = torch.randint(0, vocab, (num_tokens,), generator=g)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = token_stats_from_hidden(
            hidden, weight, tokens, temperature=1.0, proxy=ProxyFilter(0.02), chunk_size=16
        )
    assert saved, "the function saved nothing for backward"
    assert all(shape != (num_tokens, vocab) for shape in saved), saved
    assert max(torch.Size(s).numel() for s in saved) <= max(
        num_tokens * hidden_size, vocab * hidden_size
    )
    (stats.log_probs.sum() + stats.entropy.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None


def test_only_requested_gradients_and_no_grad_mode() -> None:
    prob = _problem(F64, seed=6)
    weight = prob["weight"].clone().requires_grad_()
    stats = token_stats_from_hidden(
        prob["hidden"], weight, prob["tokens"], temperature=1.0, proxy=ProxyFilter(0.02)
    )
    assert not stats.proxy_log_probs.requires_grad and not stats.proxy_keep_count.requires_grad
    stats.log_probs.sum().backward()
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all())
    with torch.no_grad():
        stats = token_stats_from_hidden(
            prob["hidden"], weight, prob["tokens"], temperature=1.0, proxy=ProxyFilter(0.02)
        )
    assert stats.log_probs.grad_fn is None


def test_empty_input() -> None:
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    stats = token_stats_from_hidden(
        hidden, weight, torch.zeros(0, dtype=torch.long), temperature=1.0, proxy=ProxyFilter(0.02)
    )
    assert stats.log_probs.shape == (0,) and stats.proxy_keep_count.shape == (0,)
    (stats.log_probs.sum() + stats.entropy.sum()).backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))


def test_bfloat16_inputs_compute_in_float32() -> None:
    prob = _problem(torch.float32, seed=7)
    hidden = prob["hidden"].to(torch.bfloat16).requires_grad_()
    weight = prob["weight"].to(torch.bfloat16).requires_grad_()
    stats = token_stats_from_hidden(
        hidden, weight, prob["tokens"], temperature=1.0, proxy=ProxyFilter(0.02), chunk_size=8
    )
    stats.log_probs.sum().backward()
    assert stats.log_probs.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16

    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    ref = token_stats_from_hidden(
        hidden32, weight32, prob["tokens"], temperature=1.0, proxy=ProxyFilter(0.02)
    )
    ref.log_probs.sum().backward()
    # Logits are rounded to bfloat16 by the half-precision matmul: about 3 significant digits.
    _assert_close(stats.log_probs, ref.log_probs, 0.1, "log_probs")
    assert hidden32.grad is not None and weight32.grad is not None
    _assert_close(hidden.grad, hidden32.grad, 0.1, "grad hidden")
    _assert_close(weight.grad, weight32.grad, 0.1, "grad weight")


def test_argument_errors() -> None:
    hidden = torch.zeros(3, 4)
    weight = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats_from_hidden(
            hidden,
            weight,
            torch.zeros(3, dtype=torch.long),
            temperature=1.0,
            proxy=ProxyFilter(0.02),
            chunk_size=0,
        )
    with pytest.raises(ValueError, match="leading"):
        token_stats_from_hidden(
            hidden,
            weight,
            torch.zeros(4, dtype=torch.long),
            temperature=1.0,
            proxy=ProxyFilter(0.02),
        )
    with pytest.raises(ValueError, match="threshold_mode"):
        token_stats_from_hidden(
            hidden,
            weight,
            torch.zeros(3, dtype=torch.long),
            temperature=1.0,
            proxy=ProxyFilter(0.02, "top_p"),  # type: ignore[arg-type]
        )


def test_micro_batches_through_the_fused_path_accumulate_the_one_batch_gradient() -> None:
    """The learner's pattern: step-wide ranking and denominator, one backward per micro-batch."""
    prob = _problem(F64, seed=8, batch=8, length=9)
    cfg = LpRegConfig(rho_neg=0.3, rho_pos=0.2, clip_low=0.2, clip_high=0.28)
    kwargs: dict[str, Any] = {"temperature": 1.0, "proxy": ProxyFilter(0.02), "chunk_size": 5}
    mask = prob["mask"]
    with torch.no_grad():
        old = token_stats_from_hidden(
            prob["hidden_old"], prob["weight_old"], prob["tokens"], **kwargs
        )
        cur = token_stats_from_hidden(prob["hidden"], prob["weight"], prob["tokens"], **kwargs)
    _, reg = select_regularized(
        cur.log_probs, old.proxy_log_probs, prob["advantages"], mask, rho_neg=0.3, rho_pos=0.2
    )
    assert int(reg.sum()) > 0
    grads = []
    for num_micro in (1, 2, 4):
        hidden = prob["hidden"].clone().requires_grad_()
        weight = prob["weight"].clone().requires_grad_()
        for rows in torch.arange(8).chunk(num_micro):
            stats = token_stats_from_hidden(hidden[rows], weight, prob["tokens"][rows], **kwargs)
            loss, _ = policy_loss(
                stats.log_probs,
                old.log_probs[rows],
                old.proxy_log_probs[rows],
                prob["advantages"][rows],
                mask[rows],
                config=cfg,
                num_tokens=float(mask.sum()),
                reg_mask=reg[rows],
            )
            loss.backward()
        grads.append((hidden.grad, weight.grad))
    for hidden_grad, weight_grad in grads[1:]:
        assert hidden_grad is not None and weight_grad is not None
        _assert_close(hidden_grad, grads[0][0], 1e-13, "grad hidden")
        _assert_close(weight_grad, grads[0][1], 1e-13, "grad weight")

"""Policy losses for RLVR: Lp-Reg and the PPO-clip baselines it is compared with.

Lp-Reg (Huang et al. 2025, "Low-probability Tokens Sustain Exploration in Reinforcement Learning
with Verifiable Reward", arXiv 2510.03222) keeps exploration alive by pulling the probability of
low-probability, non-noise tokens of negative samples back up towards a *proxy* distribution: the
old policy with its noise tokens (p < kappa * max p) filtered out and the rest renormalised.

Notation (LPREG_SPEC.md)::

    z_old, z_cur           raw logits of the behaviour (old) and current policy, shape (..., V)
    T                      sampling temperature
    log pi(o_t)            log softmax(z / T)[o_t] at the sampled token o_t
    log pi_proxy(o_t)      log softmax(filter(z_old) / T)[o_t]; filter sets logits of tokens with
                           softmax(z_old)[v] < kappa * max_u softmax(z_old)[u] to -1e4 (T = 1 for
                           the filter, "minp" mode) or with softmax(z_old)[v] < kappa ("fixed")
    r_t   = exp(log pi_theta(o_t) - log pi_old(o_t))
    D_t   = log pi_proxy(o_t) - log pi_theta(o_t)
    k3(D) = clamp(exp(D) - D - 1, -kl_clamp, kl_clamp)
    R     = {t in bottom-k_neg by log pi_theta among valid tokens with A < 0
                  (k_neg = int(n_neg * rho_neg), used only if k_neg > 1), same for A > 0 with rho_pos,
             and log pi_theta(o_t) < log pi_proxy(o_t)}
    l_t   = -A_t r_t + beta k3(D_t)                                          if t in R
    l_t   = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))      otherwise
    L     = sum_t valid_t l_t / num_tokens                                  ("token-mean")

The functions here are pure: tensors in, tensors and metrics out, no logging, no device choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FILTERED_LOGIT",
    "LOG_RATIO_CLAMP",
    "PPO_KL_METRIC_CLAMP",
    "TOKEN_MEAN_EPS",
    "ClipHigherConfig",
    "EntropyBonusConfig",
    "GRPOConfig",
    "LossConfig",
    "LossOutput",
    "LpRegConfig",
    "TokenStats",
    "lp_reg_from_logits",
    "policy_loss",
    "proxy_log_probs_from_logits",
    "select_regularized",
    "token_stats_from_hidden",
]

TOKEN_MEAN_EPS = 1e-8
"""Added to token counts by the reference's masked mean: an all-padding batch gives 0 / eps = 0."""

FILTERED_LOGIT = -1e4
"""Logit the reference gives filtered (noise) tokens: finite, so a fully filtered row stays finite."""

LOG_RATIO_CLAMP = 20.0
"""Bound on log r_t: exp(20) ~ 5e8 is far past any clip range, and a finite ratio keeps 0 * inf NaN
out of gradients of masked-out branches in float32/bf16 (the reference has no such bound)."""

PPO_KL_METRIC_CLAMP = 10.0
"""Clamp of the logged ppo_kl, the same as the reference's kl_penalty so the metric is comparable."""

DEFAULT_CHUNK_SIZE = 256
"""Tokens per logits chunk in token_stats_from_hidden: one (256 x V) float32 buffer is 155 MB at
V = 151936. On 2 CPU cores (N=2048, H=896) 128 cost 10 % more CPU time and 512 5 % less for
150 MB more peak memory (benchmarks/bench_lpreg_loss.py)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)

_LOSS_AGG_DESCRIPTION = (
    "How per-token losses become a scalar: 'token-mean' divides the sum over valid tokens by the "
    "number of valid tokens in the optimiser step; 'seq-mean-token-mean' averages each sequence "
    "over its valid tokens and then averages over sequences."
)
_TEMPERATURE_DESCRIPTION = (
    "Sampling temperature T: log-probs are log softmax(logits / T). Must equal the generators' "
    "temperature (1.0 in every released Lp-Reg run)."
)
_CLIP_LOW_DESCRIPTION = "PPO clip epsilon below 1: the ratio is clipped at 1 - clip_low."
_CLIP_HIGH_DESCRIPTION = "PPO clip epsilon above 1: the ratio is clipped at 1 + clip_high."


class LpRegConfig(BaseModel):
    """Lp-Reg: PPO-clip surrogate plus a k3 pull towards the min-p proxy on selected tokens."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: Literal["lp_reg"] = Field("lp_reg", description="Loss variant discriminator.")
    kappa: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Noise threshold of the proxy. 'minp': keep token v iff p_old(v) >= kappa * "
        "max_u p_old(u) (0.02 in the paper); 'fixed': keep v iff p_old(v) >= kappa (absolute tau). "
        "p_old is softmax of the old logits at temperature 1.",
    )
    threshold_mode: Literal["minp", "fixed"] = Field(
        "minp", description="Whether kappa is relative to the top probability ('minp') or absolute."
    )
    rho_neg: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Fraction of valid negative-advantage tokens (lowest current log-prob first) "
        "that are candidates for regularisation; k = int(n * rho_neg) and nothing happens unless "
        "k > 1. 0.01 (Qwen3-14B) or 0.005 (Qwen2.5-32B) in the paper.",
    )
    rho_pos: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Same as rho_neg for positive-advantage tokens (0, off, in every released run).",
    )
    beta: float = Field(1.0, ge=0.0, description="Weight of the k3 term on regularised tokens.")
    clip_low: float = Field(1.0, ge=0.0, le=1.0, description=_CLIP_LOW_DESCRIPTION)
    clip_high: float = Field(9.0, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)
    temperature: float = Field(1.0, gt=0.0, description=_TEMPERATURE_DESCRIPTION)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description=_LOSS_AGG_DESCRIPTION
    )
    kl_clamp: float = Field(
        10.0,
        gt=0.0,
        description="k3 is clamped to [-kl_clamp, kl_clamp]; at 10 the pull stops once "
        "pi_proxy / pi_theta > 13.6.",
    )
    ranking: Literal["step", "micro_batch"] = Field(
        "step",
        description="Scope of the bottom-k candidate ranking. 'step': over all tokens of the "
        "optimiser step (independent of how sequences are packed into micro-batches; the learner "
        "computes the mask with select_regularized and hands it to policy_loss). 'micro_batch': "
        "per micro-batch, exactly as the reference implementation does.",
    )


class _ClippedSurrogateConfig(BaseModel):
    """Fields shared by the PPO-clip baselines."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    clip_low: float = Field(0.2, ge=0.0, le=1.0, description=_CLIP_LOW_DESCRIPTION)
    clip_high: float = Field(0.2, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)
    temperature: float = Field(1.0, gt=0.0, description=_TEMPERATURE_DESCRIPTION)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description=_LOSS_AGG_DESCRIPTION
    )


class GRPOConfig(_ClippedSurrogateConfig):
    """Plain GRPO: PPO-clip surrogate with symmetric clipping."""

    type: Literal["grpo"] = Field("grpo", description="Loss variant discriminator.")


class ClipHigherConfig(_ClippedSurrogateConfig):
    """DAPO's clip-higher: PPO-clip surrogate with a wider upper clip (0.28)."""

    type: Literal["clip_higher"] = Field("clip_higher", description="Loss variant discriminator.")
    clip_high: float = Field(0.28, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)


class EntropyBonusConfig(_ClippedSurrogateConfig):
    """PPO-clip surrogate minus entropy_coef times the policy entropy at each valid token."""

    type: Literal["entropy_bonus"] = Field(
        "entropy_bonus", description="Loss variant discriminator."
    )
    entropy_coef: float = Field(
        0.001, ge=0.0, description="Weight of the entropy bonus: l_t -= entropy_coef * H_t."
    )


def default_tag(default: str) -> Discriminator:
    """A `type` discriminator that falls back to `default` when a config omits `type`."""

    def tag(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("type", default))
        return str(getattr(value, "type", default))

    return Discriminator(tag)


LossConfig = Annotated[
    Annotated[LpRegConfig, Tag("lp_reg")]
    | Annotated[GRPOConfig, Tag("grpo")]
    | Annotated[ClipHigherConfig, Tag("clip_higher")]
    | Annotated[EntropyBonusConfig, Tag("entropy_bonus")],
    default_tag("lp_reg"),
]


class LossOutput(dict[str, Tensor]):
    """Everything lp_reg_from_logits computes, keyed by name (a plain dict of tensors).

    Scalars: loss (differentiable), loss_pg, loss_kl, pg_clipfrac, ppo_kl, entropy_token_mean,
    entropy_seq_mean, num_valid_tokens, num_candidates, num_regularized, num_kl_clamped.
    Per token, shape (B, T): per_token_loss, per_token_pg, per_token_kl, log_probs (differentiable),
    old_log_probs, proxy_log_probs, proxy_keep_count, entropy (differentiable), ratio,
    candidate_mask, reg_mask.
    """


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one policy at the sampled tokens, shape (N,) each.

    log_probs and entropy are differentiable wrt hidden and lm_head_weight; proxy_log_probs and
    proxy_keep_count are constants (the proxy never carries gradient).
    """

    log_probs: Tensor
    entropy: Tensor
    proxy_log_probs: Tensor
    proxy_keep_count: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs (log-softmax over a large vocabulary needs it), else as is."""
    if dtype in _LOW_PRECISION:
        return torch.float32
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype


def _k3(delta: Tensor, clamp: float) -> Tensor:
    """clamp(exp(D) - D - 1, -clamp, clamp), the reference's 'low_var_kl' with D = log(p_tgt/p).

    D is first bounded to [-(clamp + 2), log1p(clamp) + 2]: k3 already exceeds clamp outside it,
    so values and gradients are unchanged, but exp cannot overflow and turn 0 * inf into NaN.
    """
    bounded = delta.clamp(-(clamp + 2.0), math.log1p(clamp) + 2.0)
    return (bounded.exp() - bounded - 1.0).clamp(-clamp, clamp)


# ---------------------------------------------------------------------------------------------
# Log-probs, entropy and the proxy from logits
# ---------------------------------------------------------------------------------------------


def _stats_inplace(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float,
    kappa: float,
    threshold_mode: str,
    work: Tensor,
    spare: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row-wise statistics of (R, V) raw logits without autograd, overwriting the buffers.

    Returns (log_probs, entropy, lse, proxy_log_probs, keep_count), each (R,). lse is the
    log-normaliser of logits / T (kept for the fused backward). work, and spare when T != 1, are
    (R, V) float buffers, so a chunked caller allocates them once; logits is overwritten too.

    The proxy is never materialised: with p = softmax(z / T) and K the kept set,
        logsumexp(filter(z) / T) = logaddexp(lse + log sum_{v in K} p_v, -1e4 / T + log(V - |K|)),
    which equals the reference's log-softmax of the filtered logits (the second term is what the
    -1e4 entries contribute; it matters only at extreme temperatures or when nothing is kept).
    The kept set is a 0/1 float mask: counting and masking in float is several times faster on
    CPU than with a bool tensor.
    """
    if threshold_mode not in ("minp", "fixed"):
        raise ValueError(f"threshold_mode must be 'minp' or 'fixed', got {threshold_mode!r}")
    vocab = logits.shape[-1]
    idx = tokens.unsqueeze(-1)
    row_max = logits.amax(dim=-1, keepdim=True)
    # Probabilities at temperature 1 decide what is noise, whatever the sampling temperature.
    torch.sub(logits, row_max, out=work).exp_()
    norm = work.sum(dim=-1, keepdim=True)
    work.div_(norm)
    threshold: Tensor | float = (
        kappa * work.amax(dim=-1, keepdim=True) if threshold_mode == "minp" else kappa
    )

    def kept_mask(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep = torch.ge(work, threshold, out=out)
        return keep, keep.sum(dim=-1), keep.gather(-1, idx).squeeze(-1) > 0.5

    if temperature != 1.0:
        if spare is None:
            raise ValueError("temperature != 1 needs a spare buffer")
        keep, num_kept, token_kept = kept_mask(spare)
        logits.div_(temperature)
        row_max = row_max / temperature
        torch.sub(logits, row_max, out=work).exp_()
        norm = work.sum(dim=-1, keepdim=True)
        work.div_(norm)
    token_logit = logits.gather(-1, idx).squeeze(-1)
    lse = (row_max + norm.log()).squeeze(-1)
    log_probs = token_logit - lse
    # H = -sum p log p = log(norm) - sum p (z/T - max): the shifted terms keep float32 accurate
    # over a 150k vocabulary (the unshifted lse - sum p z loses about 1e-4).
    entropy = norm.log().squeeze(-1) - logits.sub_(row_max).mul_(work).sum(dim=-1)
    if temperature == 1.0:
        keep, num_kept, token_kept = kept_mask(logits)

    filtered_logit = FILTERED_LOGIT / temperature
    kept_mass = keep.mul_(work).sum(dim=-1)
    num_filtered = vocab - num_kept
    # With nothing filtered the proxy is the policy itself: reuse lse so that on-policy
    # log_probs == proxy_log_probs bitwise and the strict "<" of the selection never fires.
    proxy_lse = torch.where(
        num_filtered == 0,
        lse,
        torch.logaddexp(lse + kept_mass.log(), filtered_logit + num_filtered.log()),
    )
    proxy_token_logit = torch.where(
        token_kept, token_logit, torch.full_like(token_logit, filtered_logit)
    )
    proxy_log_probs = proxy_token_logit - proxy_lse
    return log_probs, entropy, lse, proxy_log_probs, num_kept.round().long()


def _stats_no_grad(
    logits: Tensor, tokens: Tensor, *, temperature: float, kappa: float, threshold_mode: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log_probs, entropy, proxy_log_probs, keep_count) of (..., V) logits, without autograd."""
    with torch.no_grad():
        shape = tokens.shape
        vocab = logits.shape[-1]
        flat = logits.detach().reshape(-1, vocab).to(_compute_dtype(logits.dtype), copy=True)
        log_probs, entropy, _, proxy, keep_count = _stats_inplace(
            flat,
            tokens.reshape(-1),
            temperature=temperature,
            kappa=kappa,
            threshold_mode=threshold_mode,
            work=torch.empty_like(flat),
            spare=torch.empty_like(flat) if temperature != 1.0 else None,
        )
    return (
        log_probs.reshape(shape),
        entropy.reshape(shape),
        proxy.reshape(shape),
        keep_count.reshape(shape),
    )


def proxy_log_probs_from_logits(
    old_logits: Tensor,
    tokens: Tensor,
    *,
    kappa: float,
    threshold_mode: Literal["minp", "fixed"],
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """log pi_proxy at the sampled tokens and the size of the kept set (spec section 1).

        p        = softmax(z_old)                     (temperature 1, whatever T is)
        keep(v)  = p(v) >= kappa * max_u p(u)         ("minp")   or   p(v) >= kappa   ("fixed")
        z'       = z_old where keep else -1e4
        proxy    = log softmax(z' / T)[o_t]           (about -1e4 / T for a filtered token)

    Row-wise over the last axis, so callers may chunk the leading axes freely.

    Args:
        old_logits: (..., V) raw logits of the old (behaviour) policy; any float dtype, half
            precision is computed in float32.
        tokens: (...) sampled token ids.
    Returns:
        (proxy_log_probs (...) in the compute dtype, keep_count (...) int64), both detached.
    """
    _, _, proxy, keep_count = _stats_no_grad(
        old_logits, tokens, temperature=temperature, kappa=kappa, threshold_mode=threshold_mode
    )
    return proxy, keep_count


def _grad_logits_inplace(
    buf: Tensor,
    tokens: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    prob_buf: Tensor | None,
    vocab_offset: int = 0,
) -> Tensor:
    """d(sum g_lp log p(o) + sum g_H H) / dz for (R, W) raw logits held in buf (overwritten).

    With log p = z / T - lse:  d log p(o) / dz = (onehot(o) - p) / T  and  dH / dz = -p (log p + H) / T.
    buf may hold a vocabulary slice [vocab_offset, vocab_offset + W): the row statistics lse and
    H are of the whole row. prob_buf, an (R, W) buffer, is needed only for the entropy term.
    """
    dtype = buf.dtype
    if temperature != 1.0:
        buf.div_(temperature)
    buf.sub_(lse.unsqueeze(-1))
    g_lp = None if grad_log_probs is None else grad_log_probs.to(dtype).unsqueeze(-1)
    if grad_entropy is not None:
        if prob_buf is None:
            raise ValueError("the entropy gradient needs a probability buffer")
        probs = torch.exp(buf, out=prob_buf)
        buf.add_(entropy.unsqueeze(-1)).mul_(probs).mul_(-grad_entropy.to(dtype).unsqueeze(-1))
        if g_lp is not None:
            buf.addcmul_(probs, g_lp, value=-1.0)
    elif g_lp is not None:
        buf.exp_().mul_(-g_lp)
    else:
        return buf.zero_()
    if g_lp is not None:
        local = tokens - vocab_offset
        rows = ((local >= 0) & (local < buf.shape[-1])).nonzero().squeeze(-1)
        buf.index_put_((rows, local[rows]), g_lp.squeeze(-1)[rows], accumulate=True)
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


class _LogitsStats(torch.autograd.Function):
    """log_probs and entropy of full (R, V) logits with the same arithmetic as the fused path.

    Sharing the forward arithmetic with the proxy computation keeps on-policy log_probs and
    proxy_log_probs bitwise equal (as in the reference, where one function computes both).
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, tokens: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor]:
        buf = logits.detach().to(_compute_dtype(logits.dtype), copy=True)
        log_probs, entropy, lse, _, _ = _stats_inplace(
            buf,
            tokens,
            temperature=temperature,
            kappa=0.0,
            threshold_mode="minp",
            work=torch.empty_like(buf),
            spare=torch.empty_like(buf) if temperature != 1.0 else None,
        )
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return log_probs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        logits, tokens, lse, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None
        buf = logits.detach().to(lse.dtype, copy=True)
        prob_buf = torch.empty_like(buf) if grad_entropy is not None else None
        grad = _grad_logits_inplace(
            buf, tokens, lse, entropy, grad_log_probs, grad_entropy, ctx.temperature, prob_buf
        )
        return grad.to(logits.dtype), None, None


def _log_probs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Differentiable log softmax(z / T)[o_t] and entropy of softmax(z / T) for (..., V) logits."""
    vocab = logits.shape[-1]
    log_probs, entropy = _LogitsStats.apply(
        logits.reshape(-1, vocab), tokens.reshape(-1), float(temperature)
    )
    return log_probs.reshape(tokens.shape), entropy.reshape(tokens.shape)


# ---------------------------------------------------------------------------------------------
# Candidate selection
# ---------------------------------------------------------------------------------------------


def select_regularized(
    log_probs: Tensor,
    proxy_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    rho_neg: float,
    rho_pos: float,
) -> tuple[Tensor, Tensor]:
    """Which tokens Lp-Reg regularises (spec section 2), on detached values.

    For each branch (A < 0 with rho_neg, A > 0 with rho_pos) over the valid tokens (mask > 0):
        n = branch size, k = int(n * rho); if k > 1 the k tokens with the smallest log_probs
        are candidates (ties go to the earlier position, so the result is deterministic).
    reg = candidate and log_probs < proxy_log_probs (strict; filtered noise tokens never pass).

    The ranking is over everything passed in: hand it a micro-batch for the reference's behaviour
    or the flattened tokens of a whole optimiser step for packing-independent selection.

    Args:
        log_probs, proxy_log_probs, advantages, mask: same shape, any shape.
    Returns:
        (candidate_mask, reg_mask), bool, same shape as the inputs.
    """
    with torch.no_grad():
        shape = log_probs.shape
        logp = log_probs.detach().reshape(-1)
        proxy = proxy_log_probs.detach().reshape(-1)
        adv = advantages.detach().reshape(-1)
        valid = mask.detach().reshape(-1) > 0
        candidate = torch.zeros_like(valid)
        for branch, rho in ((valid & (adv > 0), rho_pos), (valid & (adv < 0), rho_neg)):
            index = branch.nonzero().squeeze(-1)
            n = index.numel()
            k = min(n, max(1, int(n * rho)))
            if k <= 1:
                continue
            order = torch.sort(logp[index], stable=True).indices[:k]
            candidate[index[order]] = True
        reg = candidate & (logp < proxy)
    return candidate.reshape(shape), reg.reshape(shape)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


@dataclass
class _Terms:
    per_token_pg: Tensor
    per_token_kl: Tensor
    per_token_entropy: Tensor
    clipped: Tensor
    ppo_kl: Tensor
    reg_mask: Tensor
    kl_clamped: Tensor


def _per_token_terms(
    log_probs: Tensor,
    old_log_probs: Tensor,
    proxy_log_probs: Tensor | None,
    advantages: Tensor,
    valid: Tensor,
    config: LpRegConfig | GRPOConfig | ClipHigherConfig | EntropyBonusConfig,
    reg_mask: Tensor | None,
    entropy: Tensor | None,
) -> _Terms:
    """Per-token pieces of the loss; masked positions are zeroed on input so they stay finite."""
    dtype = _compute_dtype(torch.promote_types(log_probs.dtype, old_log_probs.dtype))
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    logp = torch.where(valid, log_probs.to(dtype), zero)
    old = torch.where(valid, old_log_probs.detach().to(dtype), zero)
    adv = torch.where(valid, advantages.detach().to(dtype), zero)

    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    surrogate = torch.maximum(pg_unclipped, pg_clipped)
    with torch.no_grad():
        clipped = pg_clipped > pg_unclipped
        ppo_kl = _k3(old - logp, PPO_KL_METRIC_CLAMP)

    per_token_kl = torch.zeros_like(surrogate)
    per_token_entropy = torch.zeros_like(surrogate)
    no_tokens = torch.zeros_like(valid)
    kl_clamped = no_tokens
    if isinstance(config, LpRegConfig):
        if proxy_log_probs is None or reg_mask is None:
            raise ValueError("Lp-Reg needs proxy_log_probs and a regularisation mask")
        reg = reg_mask.to(torch.bool) & valid
        proxy = torch.where(valid, proxy_log_probs.detach().to(dtype), zero)
        delta = proxy - logp
        kl = config.beta * _k3(delta, config.kl_clamp)
        per_token_pg = torch.where(reg, pg_unclipped, surrogate)
        per_token_kl = torch.where(reg, kl, zero)
        with torch.no_grad():
            raw = delta.exp() - delta - 1.0
            kl_clamped = reg & ((raw > config.kl_clamp) | (raw < -config.kl_clamp))
    else:
        reg = no_tokens
        per_token_pg = surrogate
        if isinstance(config, EntropyBonusConfig):
            if entropy is None:
                raise ValueError("EntropyBonusConfig needs the per-token entropy")
            ent = torch.where(valid, entropy.to(dtype), zero)
            per_token_entropy = -config.entropy_coef * ent
    return _Terms(
        per_token_pg=per_token_pg,
        per_token_kl=per_token_kl,
        per_token_entropy=per_token_entropy,
        clipped=clipped,
        ppo_kl=ppo_kl,
        reg_mask=reg,
        kl_clamped=kl_clamped,
    )


def _aggregate(
    values: Tensor, valid: Tensor, *, loss_agg_mode: str, denominator: float | Tensor
) -> Tensor:
    """sum(valid * values) / denominator, per sequence first in 'seq-mean-token-mean'."""
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if loss_agg_mode == "token-mean":
        total = masked.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        if values.dim() < 1:
            raise ValueError(
                "seq-mean-token-mean needs (..., T) inputs with sequences in the last axis"
            )
        counts = valid.sum(dim=-1).to(values.dtype)
        total = (masked.sum(dim=-1) / (counts + TOKEN_MEAN_EPS)).sum()
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")
    if isinstance(denominator, Tensor):
        return total / denominator.to(total.dtype).clamp_min(TOKEN_MEAN_EPS)
    return total / max(float(denominator), TOKEN_MEAN_EPS)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    proxy_log_probs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    config: LossConfig,
    num_tokens: float | Tensor,
    reg_mask: Tensor | None = None,
    behaviour_weights: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-micro-batch policy loss with an explicit, step-wide denominator.

    Objective (Huang et al. 2025, arXiv 2510.03222; the module docstring defines R and k3)::

        r_t  = exp(clamp(log pi_theta(o_t) - log pi_old(o_t), -20, 20))
        s_t  = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
        l_t  = -A_t r_t + beta k3(log pi_proxy(o_t) - log pi_theta(o_t))   if t in R  (Lp-Reg)
             = s_t - entropy_coef H_t                                         (entropy_bonus)
             = s_t                                                            otherwise
        l_t *= w_t                                                   (behaviour_weights, if given)
        L    = sum_{valid t} l_t / num_tokens                                  ("token-mean")
        L    = sum_{seq b} [sum_{valid t in b} l_t / (n_b + 1e-8)] / num_tokens
                                                              ("seq-mean-token-mean", n_b tokens)

    Because the denominator is given, not counted here, summing this loss over the micro-batches
    of an optimiser step gives exactly the loss and gradients of the whole step in one batch.
    Pass num_tokens = valid tokens in the step for "token-mean" and the number of sequences in the
    step for "seq-mean-token-mean" (rows are then whole sequences). num_tokens = 0 (an all-padding
    step) gives 0 instead of NaN.

    Args:
        log_probs: (...) log pi_theta(o_t), differentiable; (B, T) for seq-mean-token-mean.
        old_log_probs: (...) log pi_old(o_t) of the behaviour policy (the ratio's denominator).
        proxy_log_probs: (...) log pi_proxy(o_t); required for Lp-Reg, ignored otherwise.
        advantages: (...) per-token advantages A_t.
        mask: (...) valid tokens (> 0); padding can hold any finite or infinite garbage.
        config: the loss variant.
        num_tokens: the step-wide denominator described above.
        reg_mask: (...) bool Lp-Reg set R, precomputed with select_regularized over the whole step
            (ranking="step"). If None and config is LpRegConfig, R is selected on this micro-batch
            (ranking="micro_batch", the reference's behaviour).
        behaviour_weights: (...) optional per-token importance weights for stale rollouts
            (truncated IS / decoupled PPO); detached and multiplied into l_t.
        entropy: (...) per-token entropy H_t, required for EntropyBonusConfig.
    Returns:
        (loss, metrics). Every metric is this micro-batch's share of the step value, so metrics of
        the micro-batches of a step are SUMMED: loss_pg, loss_kl, loss_entropy (the three parts of
        loss), pg_clipfrac and ppo_kl (aggregated like the loss, computed before the Lp-Reg
        override, ppo_kl = masked k3(log pi_theta, log pi_old) clamped at 10), and the counts
        num_valid_tokens, num_regularized, num_kl_clamped, plus num_candidates when R was selected
        here. All metrics are detached.
    """
    valid = mask > 0
    candidate_mask: Tensor | None = None
    if isinstance(config, LpRegConfig):
        if proxy_log_probs is None:
            raise ValueError("LpRegConfig needs proxy_log_probs")
        if reg_mask is None:
            candidate_mask, reg_mask = select_regularized(
                log_probs,
                proxy_log_probs,
                advantages,
                valid,
                rho_neg=config.rho_neg,
                rho_pos=config.rho_pos,
            )
    terms = _per_token_terms(
        log_probs, old_log_probs, proxy_log_probs, advantages, valid, config, reg_mask, entropy
    )
    per_token_pg = terms.per_token_pg
    per_token_kl = terms.per_token_kl
    per_token_entropy = terms.per_token_entropy
    if behaviour_weights is not None:
        weights = torch.where(
            valid, behaviour_weights.detach().to(per_token_pg.dtype), per_token_pg.new_zeros(())
        )
        per_token_pg = per_token_pg * weights
        per_token_kl = per_token_kl * weights
        per_token_entropy = per_token_entropy * weights

    def agg(values: Tensor) -> Tensor:
        return _aggregate(values, valid, loss_agg_mode=config.loss_agg_mode, denominator=num_tokens)

    loss = agg(per_token_pg + per_token_kl + per_token_entropy)
    with torch.no_grad():
        metrics = {
            "loss_pg": agg(per_token_pg.detach()),
            "loss_kl": agg(per_token_kl.detach()),
            "loss_entropy": agg(per_token_entropy.detach()),
            "pg_clipfrac": agg(terms.clipped.to(per_token_pg.dtype)),
            "ppo_kl": agg(terms.ppo_kl),
            "num_valid_tokens": valid.sum(),
            "num_regularized": terms.reg_mask.sum(),
            "num_kl_clamped": terms.kl_clamped.sum(),
        }
        if candidate_mask is not None:
            metrics["num_candidates"] = (candidate_mask & valid).sum()
    return loss, metrics


def lp_reg_from_logits(
    logits: Tensor,
    old_logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: LpRegConfig,
) -> LossOutput:
    """Lp-Reg on full logits with the reference's semantics (one micro-batch, ranked as a whole).

    Objective: see policy_loss. Here num_tokens = (valid tokens + 1e-8) for "token-mean" and B for
    "seq-mean-token-mean" (the reference's masked mean and mean over rows), pg_clipfrac and ppo_kl
    are masked token means as the reference logs them, and R is selected over this input.
    log_probs and old_log_probs are log softmax(z / T)[o_t]; the proxy comes from old_logits.
    This materialises (B, T, V) tensors: it is the executable specification and the parity check
    for token_stats_from_hidden, which the learner uses at scale.

    Args:
        logits: (B, T, V) raw logits of the current policy; gradients flow into them.
        old_logits: (B, T, V) raw logits of the old (behaviour) policy; no gradient.
        tokens: (B, T) sampled token ids.
        advantages: (B, T) per-token advantages (sequence advantage times the mask).
        response_mask: (B, T) 1 for tokens that count.
        config: the Lp-Reg hyper-parameters (config.ranking does not apply: the input is the unit).
    Returns:
        LossOutput (see its docstring); loss is differentiable wrt logits.
    """
    valid = response_mask > 0
    log_probs, entropy = _log_probs_and_entropy(logits, tokens, config.temperature)
    old_log_probs, _, proxy, keep_count = _stats_no_grad(
        old_logits,
        tokens,
        temperature=config.temperature,
        kappa=config.kappa,
        threshold_mode=config.threshold_mode,
    )
    candidate_mask, reg_mask = select_regularized(
        log_probs, proxy, advantages, valid, rho_neg=config.rho_neg, rho_pos=config.rho_pos
    )
    terms = _per_token_terms(
        log_probs, old_log_probs, proxy, advantages, valid, config, reg_mask, None
    )
    if config.loss_agg_mode == "token-mean":
        denominator: float | Tensor = valid.sum().to(terms.per_token_pg.dtype) + TOKEN_MEAN_EPS
    else:
        denominator = float(valid.shape[0])

    def agg(values: Tensor) -> Tensor:
        return _aggregate(
            values, valid, loss_agg_mode=config.loss_agg_mode, denominator=denominator
        )

    per_token_loss = terms.per_token_pg + terms.per_token_kl
    loss = agg(per_token_loss)
    with torch.no_grad():
        valid_f = valid.to(terms.per_token_pg.dtype)
        num_valid = valid_f.sum()
        token_mean_denominator = num_valid + TOKEN_MEAN_EPS
        ent = entropy.detach()
        seq_counts = valid_f.sum(dim=-1)
        seq_means = (ent * valid_f).sum(dim=-1) / seq_counts.clamp_min(1.0)
        has_tokens = seq_counts > 0
        num_seqs = has_tokens.sum().clamp_min(1)
        out = LossOutput(
            loss=loss,
            loss_pg=agg(terms.per_token_pg.detach()),
            loss_kl=agg(terms.per_token_kl.detach()),
            per_token_loss=per_token_loss.detach(),
            per_token_pg=terms.per_token_pg.detach(),
            per_token_kl=terms.per_token_kl.detach(),
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            proxy_log_probs=proxy,
            proxy_keep_count=keep_count,
            entropy=entropy,
            ratio=torch.exp(log_probs.detach() - old_log_probs),
            candidate_mask=candidate_mask,
            reg_mask=reg_mask,
            pg_clipfrac=(terms.clipped & valid).sum().to(valid_f.dtype) / token_mean_denominator,
            ppo_kl=(terms.ppo_kl * valid_f).sum() / token_mean_denominator,
            entropy_token_mean=(ent * valid_f).sum() / num_valid.clamp_min(1.0),
            entropy_seq_mean=torch.where(has_tokens, seq_means, 0.0).sum() / num_seqs,
            num_valid_tokens=valid.sum(),
            num_candidates=(candidate_mask & valid).sum(),
            num_regularized=terms.reg_mask.sum(),
            num_kl_clamped=terms.kl_clamped.sum(),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Fused, chunked statistics from hidden states
# ---------------------------------------------------------------------------------------------


def _chunk_logits(hidden: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out[:] = hidden @ weight.T in out's dtype (a half-precision matmul is upcast after)."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        return torch.mm(hidden, weight.t(), out=out)
    return out.copy_(torch.mm(hidden, weight.t()))


class _FusedTokenStats(torch.autograd.Function):
    """log_probs and entropy of hidden @ W.T, recomputing one chunk of logits at a time.

    Forward keeps only (N,) results and the log-normaliser; backward recomputes the logits one
    (N, vocabulary block) at a time, forms d/dlogits in place and feeds the matmuls for hidden
    and W.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        temperature: float,
        kappa: float,
        threshold_mode: str,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        log_probs = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        entropy = torch.empty_like(log_probs)
        lse = torch.empty_like(log_probs)
        proxy = torch.empty_like(log_probs)
        keep_count = torch.empty(num_rows, dtype=torch.long, device=hidden.device)
        rows = min(chunk_size, num_rows)
        # Reused across chunks: a fresh (chunk, V) allocation per chunk costs page faults on CPU.
        logits_buf = torch.empty((rows, vocab), dtype=dtype, device=hidden.device)
        work_buf = torch.empty_like(logits_buf)
        spare_buf = torch.empty_like(logits_buf) if temperature != 1.0 else None
        for start in range(0, num_rows, chunk_size):
            stop = min(num_rows, start + chunk_size)
            n = stop - start
            logits = _chunk_logits(hidden[start:stop], weight, logits_buf[:n])
            (
                log_probs[start:stop],
                entropy[start:stop],
                lse[start:stop],
                proxy[start:stop],
                keep_count[start:stop],
            ) = _stats_inplace(
                logits,
                tokens[start:stop],
                temperature=temperature,
                kappa=kappa,
                threshold_mode=threshold_mode,
                work=work_buf[:n],
                spare=None if spare_buf is None else spare_buf[:n],
            )
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(proxy, keep_count)
        ctx.set_materialize_grads(False)
        return log_probs, entropy, proxy, keep_count

    @staticmethod
    def backward(
        ctx: Any,
        grad_log_probs: Tensor | None,
        grad_entropy: Tensor | None,
        _grad_proxy: Tensor | None,
        _grad_keep_count: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 5
        if (grad_log_probs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None, None, *nones)
        temperature: float = ctx.temperature
        chunk_size: int = ctx.chunk_size
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = lse.dtype
        # Backward needs no row-wide threshold, so it walks the vocabulary instead of the tokens:
        # each weight row's gradient is then written once (no read-modify-write of a V x H
        # accumulator per chunk) and all three matmuls see the full token dimension. The block
        # holds as many elements as a forward chunk.
        block = max(1, min(vocab, (chunk_size * vocab) // max(num_rows, 1)))
        acc_dtype = _compute_dtype(weight.dtype)
        hidden_acc = hidden.to(acc_dtype)
        grad_hidden = (
            torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
            if need_hidden
            else None
        )
        grad_weight = torch.empty_like(weight) if need_weight else None
        logits_storage = torch.empty(num_rows * block, dtype=dtype, device=hidden.device)
        prob_storage = torch.empty_like(logits_storage) if grad_entropy is not None else None
        g_lp = None if grad_log_probs is None else grad_log_probs.to(dtype)
        g_ent = None if grad_entropy is None else grad_entropy.to(dtype)
        for start in range(0, vocab, block):
            stop = min(vocab, start + block)
            width = stop - start
            weight_block = weight[start:stop]
            logits = logits_storage[: num_rows * width].view(num_rows, width)
            grad = _grad_logits_inplace(
                _chunk_logits(hidden, weight_block, logits),
                tokens,
                lse,
                entropy,
                g_lp,
                g_ent,
                temperature,
                None
                if prob_storage is None
                else prob_storage[: num_rows * width].view(num_rows, width),
                vocab_offset=start,
            )
            grad = grad.to(acc_dtype)
            if grad_hidden is not None:
                grad_hidden.addmm_(grad, weight_block.to(acc_dtype))
            if grad_weight is not None:
                if grad_weight.dtype == acc_dtype:
                    torch.mm(grad.t(), hidden_acc, out=grad_weight[start:stop])
                else:
                    grad_weight[start:stop] = torch.mm(grad.t(), hidden_acc)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return (grad_hidden, grad_weight, *nones)


def token_stats_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float,
    kappa: float,
    threshold_mode: Literal["minp", "fixed"] = "minp",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """log pi(o_t), entropy and log pi_proxy(o_t) from final hidden states, chunk by chunk.

    With z = hidden @ lm_head_weight.T (no bias, as in Qwen/Llama heads)::

        log_probs       = log softmax(z / T)[o_t]                  grad to hidden and weight
        entropy         = -sum_v p_v log p_v,  p = softmax(z / T)   grad to hidden and weight
        proxy_log_probs = proxy_log_probs_from_logits(z, ...)       constant
        proxy_keep_count

    Memory: the forward walks the tokens in chunks of chunk_size rows, holding one
    (chunk_size, V) block of logits and one same-sized work buffer (a third one when T != 1);
    it cannot split the vocabulary, because the min-p threshold needs the whole row. Only
    hidden, the weight, tokens and two (N,) vectors are saved. The backward recomputes the logits
    in (N, V * chunk_size / N) vocabulary blocks, the same number of elements as a forward chunk,
    so each weight row's gradient is written once. Beyond the weight and its gradient, memory is
    O(chunk_size * V + N * H). Cost: one extra logits matmul (the recomputation).

    Results equal lp_reg_from_logits on hidden @ W.T to rounding (1e-5 float32, 1e-10 float64,
    gradients included); entropy is differentiable. Half-precision inputs are computed in
    float32: outputs are float32 and the gradients come back in the inputs' dtypes.

    The proxy uses the weights passed in, so it is the old policy's proxy only when these are the
    step-start weights (the first forward of an on-policy step, or a no-grad pass before the
    updates of an off-policy step whose proxy_log_probs are then kept).

    Args:
        hidden: (..., H) final hidden states at the positions that predict tokens.
        lm_head_weight: (V, H) output embedding.
        tokens: (...) sampled token ids.
    Returns:
        TokenStats with (...)-shaped tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree on leading axes"
        )
    if threshold_mode not in ("minp", "fixed"):
        raise ValueError(f"threshold_mode must be 'minp' or 'fixed', got {threshold_mode!r}")
    shape = tokens.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1)
    log_probs, entropy, proxy, keep_count = _FusedTokenStats.apply(
        flat_hidden,
        lm_head_weight,
        flat_tokens,
        float(temperature),
        float(kappa),
        threshold_mode,
        int(chunk_size),
    )
    return TokenStats(
        log_probs=log_probs.reshape(shape),
        entropy=entropy.reshape(shape),
        proxy_log_probs=proxy.reshape(shape),
        proxy_keep_count=keep_count.reshape(shape),
    )

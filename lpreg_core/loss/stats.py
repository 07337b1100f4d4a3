"""Token statistics from full logits: log pi(o_t), entropy and the proxy (docs/algorithm.md section 1).

This is the reference path: it takes (..., V) logits, so it holds a vocabulary-sized tensor. The
learner's path, token_stats_from_hidden (lpreg_core.loss.fused), shares its row arithmetic
(_stats_inplace, grad_logits_inplace) one chunk of logits at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lpreg_core.loss.numerics import FILTERED_LOGIT, compute_dtype
from lpreg_core.loss_config import ProxyFilter, ThresholdMode

__all__ = ["TokenStats", "log_probs_and_entropy", "proxy_log_probs_from_logits"]


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one policy at the sampled tokens, shape (N,) each.

    log_probs and entropy are differentiable wrt hidden and lm_head_weight; proxy_log_probs and
    proxy_keep_count are constants (the proxy never carries gradient), and None when no proxy was
    asked for.
    """

    log_probs: Tensor
    entropy: Tensor
    proxy_log_probs: Tensor | None
    proxy_keep_count: Tensor | None


class RowStats(NamedTuple):
    """Row-wise results of _stats_inplace, each (R,)."""

    log_probs: Tensor
    entropy: Tensor
    lse: Tensor  # log-normaliser of logits / T, kept for the recomputing backward
    proxy_log_probs: Tensor | None
    keep_count: Tensor | None


def stats_inplace(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float,
    proxy: ProxyFilter | None,
    work: Tensor,
    spare: Tensor | None,
) -> RowStats:
    """Row-wise statistics of (R, V) raw logits without autograd, overwriting the buffers.

    work, and spare when T != 1 and a proxy is asked for, are (R, V) float buffers, so a chunked
    caller allocates them once; logits is overwritten too.

    The proxy is never materialised: with p = softmax(z / T) and K the kept set,
        logsumexp(filter(z) / T) = logaddexp(lse + log sum_{v in K} p_v, -1e4 / T + log(V - |K|)),
    which equals the reference's log-softmax of the filtered logits (the second term is what the
    -1e4 entries contribute; it matters only at extreme temperatures or when nothing is kept).
    The kept set is a 0/1 float mask: counting and masking in float is several times faster on
    CPU than with a bool tensor.
    """
    vocab = logits.shape[-1]
    idx = tokens.unsqueeze(-1)
    row_max = logits.amax(dim=-1, keepdim=True)

    def softmax_into_work() -> Tensor:
        torch.sub(logits, row_max, out=work).exp_()
        norm = work.sum(dim=-1, keepdim=True)
        work.div_(norm)
        return norm

    threshold: Tensor | float = 0.0

    def kept_mask(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep = torch.ge(work, threshold, out=out)
        return keep, keep.sum(dim=-1), keep.gather(-1, idx).squeeze(-1) > 0.5

    if proxy is not None or temperature == 1.0:
        norm = softmax_into_work()
    if proxy is not None:
        # Probabilities at temperature 1 decide what is noise, whatever the sampling temperature.
        threshold = (
            proxy.kappa * work.amax(dim=-1, keepdim=True)
            if proxy.threshold_mode == "minp"
            else proxy.kappa
        )
    if temperature != 1.0:
        if proxy is not None:
            if spare is None:
                raise ValueError("temperature != 1 with a proxy needs a spare buffer")
            keep, num_kept, token_kept = kept_mask(spare)
        logits.div_(temperature)
        row_max = row_max / temperature
        norm = softmax_into_work()
    token_logit = logits.gather(-1, idx).squeeze(-1)
    lse = (row_max + norm.log()).squeeze(-1)
    log_probs = token_logit - lse
    # H = -sum p log p = log(norm) - sum p (z/T - max): the shifted terms keep float32 accurate
    # over a 150k vocabulary (the unshifted lse - sum p z loses about 1e-4).
    entropy = norm.log().squeeze(-1) - logits.sub_(row_max).mul_(work).sum(dim=-1)
    if proxy is None:
        return RowStats(log_probs, entropy, lse, None, None)
    if temperature == 1.0:
        keep, num_kept, token_kept = kept_mask(logits)

    kept_mass = keep.mul_(work).sum(dim=-1)
    proxy_log_probs = proxy_from_kept_set(
        lse=lse,
        token_logit=token_logit,
        log_kept_mass=lse + kept_mass.log(),
        num_filtered=vocab - num_kept,
        token_kept=token_kept,
        temperature=temperature,
    )
    return RowStats(log_probs, entropy, lse, proxy_log_probs, num_kept.round().long())


def proxy_from_kept_set(
    *,
    lse: Tensor,
    token_logit: Tensor,
    log_kept_mass: Tensor,
    num_filtered: Tensor,
    token_kept: Tensor,
    temperature: float,
) -> Tensor:
    """log pi_proxy(o_t) from the kept set's log-mass at T: log sum_{v kept} exp(z_v / T).

    The filtered logits (-1e4 / T each, num_filtered of them) join the normaliser as the
    reference's log-softmax of the filtered logits has them; token_logit is z_o / T. All (R,).
    """
    filtered_logit = FILTERED_LOGIT / temperature
    # With nothing filtered the proxy is the policy itself: reuse lse so that on-policy
    # log_probs == proxy_log_probs bitwise and the strict "<" of the selection never fires.
    proxy_lse = torch.where(
        num_filtered == 0,
        lse,
        torch.logaddexp(log_kept_mass, filtered_logit + num_filtered.log()),
    )
    proxy_token_logit = torch.where(
        token_kept, token_logit, torch.full_like(token_logit, filtered_logit)
    )
    return proxy_token_logit - proxy_lse


def stats_no_grad(
    logits: Tensor, tokens: Tensor, *, temperature: float, proxy: ProxyFilter | None
) -> RowStats:
    """stats_inplace of (..., V) logits on a copy, without autograd, reshaped like tokens."""
    with torch.no_grad():
        vocab = logits.shape[-1]
        flat = logits.detach().reshape(-1, vocab).to(compute_dtype(logits.dtype), copy=True)
        stats = stats_inplace(
            flat,
            tokens.reshape(-1),
            temperature=temperature,
            proxy=proxy,
            work=torch.empty_like(flat),
            spare=torch.empty_like(flat) if temperature != 1.0 and proxy is not None else None,
        )
    return RowStats._make(None if t is None else t.reshape(tokens.shape) for t in stats)


def proxy_log_probs_from_logits(
    old_logits: Tensor,
    tokens: Tensor,
    *,
    kappa: float,
    threshold_mode: ThresholdMode,
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
    stats = stats_no_grad(
        old_logits,
        tokens,
        temperature=temperature,
        proxy=ProxyFilter(kappa=kappa, threshold_mode=threshold_mode),
    )
    assert stats.proxy_log_probs is not None and stats.keep_count is not None
    return stats.proxy_log_probs, stats.keep_count


def grad_logits_inplace(
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
        buf = logits.detach().to(compute_dtype(logits.dtype), copy=True)
        stats = stats_inplace(
            buf, tokens, temperature=temperature, proxy=None, work=torch.empty_like(buf), spare=None
        )
        ctx.save_for_backward(logits, tokens, stats.lse, stats.entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return stats.log_probs, stats.entropy

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        logits, tokens, lse, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None
        buf = logits.detach().to(lse.dtype, copy=True)
        prob_buf = torch.empty_like(buf) if grad_entropy is not None else None
        grad = grad_logits_inplace(
            buf, tokens, lse, entropy, grad_log_probs, grad_entropy, ctx.temperature, prob_buf
        )
        return grad.to(logits.dtype), None, None


def log_probs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Differentiable log softmax(z / T)[o_t] and entropy of softmax(z / T) for (..., V) logits."""
    vocab = logits.shape[-1]
    log_probs, entropy = _LogitsStats.apply(
        logits.reshape(-1, vocab), tokens.reshape(-1), float(temperature)
    )
    return log_probs.reshape(tokens.shape), entropy.reshape(tokens.shape)

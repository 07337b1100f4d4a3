"""Per-token terms of the loss: the PPO-clip surrogate, Lp-Reg's k3 pull, the entropy bonus."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpreg_core.loss.numerics import LOG_RATIO_CLAMP, PPO_KL_METRIC_CLAMP, compute_dtype, k3
from lpreg_core.loss_config import (
    ClipHigherConfig,
    EntropyBonusConfig,
    GRPOConfig,
    LpRegConfig,
)


@dataclass
class Terms:
    """Per-token pieces of l_t, same shape as the inputs; the masks and ppo_kl are detached."""

    per_token_pg: Tensor
    per_token_kl: Tensor
    per_token_entropy: Tensor
    clipped: Tensor
    ppo_kl: Tensor
    reg_mask: Tensor
    kl_clamped: Tensor


def per_token_terms(
    log_probs: Tensor,
    old_log_probs: Tensor,
    proxy_log_probs: Tensor | None,
    advantages: Tensor,
    valid: Tensor,
    config: LpRegConfig | GRPOConfig | ClipHigherConfig | EntropyBonusConfig,
    reg_mask: Tensor | None,
    entropy: Tensor | None,
) -> Terms:
    """Per-token pieces of the loss; masked positions are zeroed on input so they stay finite."""
    dtype = compute_dtype(torch.promote_types(log_probs.dtype, old_log_probs.dtype))
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
        ppo_kl = k3(old - logp, PPO_KL_METRIC_CLAMP)

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
        kl = config.beta * k3(delta, config.kl_clamp)
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
    return Terms(
        per_token_pg=per_token_pg,
        per_token_kl=per_token_kl,
        per_token_entropy=per_token_entropy,
        clipped=clipped,
        ppo_kl=ppo_kl,
        reg_mask=reg,
        kl_clamped=kl_clamped,
    )

"""The policy loss: policy_loss (the learner's, per micro-batch) and lp_reg_from_logits (the
reference's semantics on full logits, the executable specification)."""

from __future__ import annotations

import torch
from torch import Tensor

from lpreg_core.loss.aggregate import aggregate
from lpreg_core.loss.numerics import TOKEN_MEAN_EPS
from lpreg_core.loss.select import select_regularized
from lpreg_core.loss.stats import log_probs_and_entropy, stats_no_grad
from lpreg_core.loss.terms import per_token_terms
from lpreg_core.loss_config import LossConfig, LpRegConfig


class LossOutput(dict[str, Tensor]):
    """Everything lp_reg_from_logits computes, keyed by name (a plain dict of tensors).

    Scalars: loss (differentiable), loss_pg, loss_kl, pg_clipfrac, ppo_kl, entropy_token_mean,
    entropy_seq_mean, num_valid_tokens, num_candidates, num_regularized, num_kl_clamped.
    Per token, shape (B, T): per_token_loss, per_token_pg, per_token_kl, log_probs (differentiable),
    old_log_probs, proxy_log_probs, proxy_keep_count, entropy (differentiable), ratio,
    candidate_mask, reg_mask.
    """


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
    terms = per_token_terms(
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
        return aggregate(values, valid, loss_agg_mode=config.loss_agg_mode, denominator=num_tokens)

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
    log_probs, entropy = log_probs_and_entropy(logits, tokens, config.temperature)
    old = stats_no_grad(
        old_logits, tokens, temperature=config.temperature, proxy=config.proxy_filter
    )
    old_log_probs, proxy, keep_count = old.log_probs, old.proxy_log_probs, old.keep_count
    assert proxy is not None and keep_count is not None
    candidate_mask, reg_mask = select_regularized(
        log_probs, proxy, advantages, valid, rho_neg=config.rho_neg, rho_pos=config.rho_pos
    )
    terms = per_token_terms(
        log_probs, old_log_probs, proxy, advantages, valid, config, reg_mask, None
    )
    if config.loss_agg_mode == "token-mean":
        denominator: float | Tensor = valid.sum().to(terms.per_token_pg.dtype) + TOKEN_MEAN_EPS
    else:
        denominator = float(valid.shape[0])

    def agg(values: Tensor) -> Tensor:
        return aggregate(values, valid, loss_agg_mode=config.loss_agg_mode, denominator=denominator)

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

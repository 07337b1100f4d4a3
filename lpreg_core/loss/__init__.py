"""Policy losses for RLVR: Lp-Reg and the PPO-clip baselines it is compared with.

Lp-Reg (Huang et al. 2025, "Low-probability Tokens Sustain Exploration in Reinforcement Learning
with Verifiable Reward", arXiv 2510.03222) keeps exploration alive by pulling the probability of
low-probability, non-noise tokens of negative samples back up towards a *proxy* distribution: the
old policy with its noise tokens (p < kappa * max p) filtered out and the rest renormalised.

Notation (docs/algorithm.md)::

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

Modules, in the order of the paper's computation:
    lpreg_core.loss_config  the typed variants (torch-free) and what each needs from the statistics
    stats        log pi, entropy and the proxy from full logits (the reference path); TokenStats
    chunked      the same from hidden states, one (chunk, V) block of logits at a time
    triton_stats the same as Triton kernels (GPU), imported only when they run
    from_hidden  token_stats_from_hidden, the learner's entry point to the statistics, and the
                 choice between the two implementations
    select       select_regularized: the candidates and the regularised set R
    terms        the per-token terms l_t
    aggregate    token-mean / seq-mean-token-mean
    policy       policy_loss (per micro-batch, step-wide denominator) and lp_reg_from_logits
    numerics     named numerical guards
"""

from lpreg_core.loss.from_hidden import (
    BackendChoice,
    StatsBackend,
    select_stats_backend,
    token_stats_from_hidden,
)
from lpreg_core.loss.numerics import (
    DEFAULT_CHUNK_SIZE,
    FILTERED_LOGIT,
    LOG_RATIO_CLAMP,
    PPO_KL_METRIC_CLAMP,
    TOKEN_MEAN_EPS,
)
from lpreg_core.loss.policy import LossOutput, lp_reg_from_logits, policy_loss
from lpreg_core.loss.select import select_regularized
from lpreg_core.loss.stats import TokenStats, proxy_log_probs_from_logits
from lpreg_core.loss_config import (
    ClipHigherConfig,
    EntropyBonusConfig,
    GRPOConfig,
    LossConfig,
    LpRegConfig,
    ProxyFilter,
    StepRanking,
    ThresholdMode,
    default_tag,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FILTERED_LOGIT",
    "LOG_RATIO_CLAMP",
    "PPO_KL_METRIC_CLAMP",
    "TOKEN_MEAN_EPS",
    "BackendChoice",
    "ClipHigherConfig",
    "EntropyBonusConfig",
    "GRPOConfig",
    "LossConfig",
    "LossOutput",
    "LpRegConfig",
    "ProxyFilter",
    "StatsBackend",
    "StepRanking",
    "ThresholdMode",
    "TokenStats",
    "default_tag",
    "lp_reg_from_logits",
    "policy_loss",
    "proxy_log_probs_from_logits",
    "select_regularized",
    "select_stats_backend",
    "token_stats_from_hidden",
]

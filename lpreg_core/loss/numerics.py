"""Numerical guards shared by the loss modules, each with the reason it exists."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs (log-softmax over a large vocabulary needs it), else as is."""
    if dtype in _LOW_PRECISION:
        return torch.float32
    if not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype


def k3(delta: Tensor, clamp: float) -> Tensor:
    """clamp(exp(D) - D - 1, -clamp, clamp), the reference's 'low_var_kl' with D = log(p_tgt/p).

    D is first bounded to [-(clamp + 2), log1p(clamp) + 2]: k3 already exceeds clamp outside it,
    so values and gradients are unchanged, but exp cannot overflow and turn 0 * inf into NaN.
    """
    bounded = delta.clamp(-(clamp + 2.0), math.log1p(clamp) + 2.0)
    return (bounded.exp() - bounded - 1.0).clamp(-clamp, clamp)

"""From per-token losses to the scalar the optimiser sees."""

from __future__ import annotations

import torch
from torch import Tensor

from lpreg_core.loss.numerics import TOKEN_MEAN_EPS


def aggregate(
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

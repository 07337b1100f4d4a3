"""Which tokens Lp-Reg regularises (docs/algorithm.md section 2)."""

from __future__ import annotations

import torch
from torch import Tensor


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

"""Group-relative advantages for outcome rewards (GRPO and its variants).

Each prompt is sampled n times; a completion's advantage is its reward relative to its group::

    "std"            A_i = (r_i - mean(r)) / (std(r) + eps)     GRPO (Shao et al. 2024), as used by
                                                                Lp-Reg; std is unbiased (n - 1)
    "no_std"         A_i = r_i - mean(r)                        Dr. GRPO (Liu et al. 2025)
    "leave_one_out"  A_i = r_i - mean_{j != i} r_j              RLOO (Ahmadian et al. 2024)
                         = n / (n - 1) * (r_i - mean(r))

A group whose rewards are all equal carries no signal and gets exactly 0 in every mode. A group
of one (n == 1) has no baseline and also gets 0; verl instead uses mean 0 and std 1 there, which
would turn a lone rollout's raw reward into its advantage.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["AdvantageMode", "grpo_advantages"]

AdvantageMode = Literal["std", "no_std", "leave_one_out"]


def grpo_advantages(rewards: Tensor, *, mode: AdvantageMode = "std", eps: float = 1e-6) -> Tensor:
    """Advantages of n completions per prompt from their scalar rewards.

    Args:
        rewards: (G, n) rewards, one row per prompt group (any real dtype; integers become the
            default float dtype).
        mode: "std", "no_std" or "leave_one_out" (see the module docstring).
        eps: added to the standard deviation in "std" mode (1e-6 in GRPO and Lp-Reg).
    Returns:
        (G, n) advantages in a floating dtype, no gradient.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, samples), got shape {tuple(rewards.shape)}")
    if mode not in ("std", "no_std", "leave_one_out"):
        raise ValueError(f"unknown advantage mode {mode!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    values = rewards.detach()
    if not values.dtype.is_floating_point:
        values = values.to(torch.get_default_dtype())
    num_samples = values.shape[-1]
    if num_samples < 2 or values.numel() == 0:
        return torch.zeros_like(values)
    centered = values - values.mean(dim=-1, keepdim=True)
    # A group of equal rewards must give exactly 0, not rounding noise divided by eps.
    constant = values.amax(dim=-1, keepdim=True) == values.amin(dim=-1, keepdim=True)
    centered = torch.where(constant, torch.zeros_like(centered), centered)
    if mode == "std":
        return centered / (values.std(dim=-1, keepdim=True, correction=1) + eps)
    if mode == "no_std":
        return centered
    return centered * (num_samples / (num_samples - 1))

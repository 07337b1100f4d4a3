"""GRPO-family advantages from per-group rewards."""

from __future__ import annotations

import math

import pytest
import torch

from lpreg_core.advantages import grpo_advantages

F64 = torch.float64


def test_std_mode_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    adv = grpo_advantages(rewards)
    # Row 0: mean 0.5, unbiased std sqrt(1/3). Row 1: mean 0.25, unbiased std 0.5.
    std0 = math.sqrt(1.0 / 3.0)
    want = torch.tensor(
        [
            [0.5 / (std0 + 1e-6), -0.5 / (std0 + 1e-6), -0.5 / (std0 + 1e-6), 0.5 / (std0 + 1e-6)],
            [0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-14)


def test_std_mode_matches_verl_formula() -> None:
    """(r - mean) / (torch.std(group) + eps), the reference's compute_grpo_outcome_advantage."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(16, 8, generator=g, dtype=F64)
    want = torch.stack([(row - row.mean()) / (torch.std(row) + 1e-6) for row in rewards])
    torch.testing.assert_close(grpo_advantages(rewards), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["std", "no_std", "leave_one_out"])
def test_identical_rewards_give_exactly_zero(mode: str) -> None:
    rewards = torch.tensor([[1.0] * 8, [0.0] * 8, [0.1] * 8, [0.7] * 8], dtype=F64)
    adv = grpo_advantages(rewards, mode=mode)  # type: ignore[arg-type]
    assert torch.equal(adv, torch.zeros_like(rewards))


@pytest.mark.parametrize("mode", ["std", "no_std", "leave_one_out"])
def test_group_of_one_gives_zero(mode: str) -> None:
    adv = grpo_advantages(torch.tensor([[1.0], [0.0]]), mode=mode)  # type: ignore[arg-type]
    assert torch.equal(adv, torch.zeros(2, 1))


def test_no_std_and_leave_one_out() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(grpo_advantages(rewards, mode="no_std"), rewards - 0.6)
    loo = torch.stack(
        [rewards[0, i] - torch.cat([rewards[0, :i], rewards[0, i + 1 :]]).mean() for i in range(5)]
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, mode="leave_one_out")[0], loo, rtol=0, atol=1e-15
    )


def test_advantages_sum_to_zero_per_group() -> None:
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (32, 8), generator=g).to(F64)
    for mode in ("std", "no_std", "leave_one_out"):
        adv = grpo_advantages(rewards, mode=mode)  # type: ignore[arg-type]
        torch.testing.assert_close(adv.sum(dim=-1), torch.zeros(32, dtype=F64), rtol=0, atol=1e-12)


def test_dtypes_and_gradients() -> None:
    assert grpo_advantages(torch.tensor([[1, 0, 1, 1]])).dtype == torch.get_default_dtype()
    assert grpo_advantages(torch.tensor([[1.0, 0.0]], dtype=F64)).dtype == F64
    rewards = torch.tensor([[1.0, 0.0]], requires_grad=True)
    assert not grpo_advantages(rewards).requires_grad
    assert grpo_advantages(torch.zeros(0, 8)).shape == (0, 8)


def test_eps_bounds_tiny_spreads() -> None:
    rewards = torch.tensor([[0.0, 1e-9]], dtype=F64)
    adv = grpo_advantages(rewards, eps=1e-6)
    assert float(adv.abs().max()) < 1e-3


@pytest.mark.parametrize(
    ("rewards", "kwargs", "match"),
    [
        (torch.zeros(8), {}, "groups"),
        (torch.zeros(2, 3, 4), {}, "groups"),
        (torch.zeros(2, 4), {"mode": "median"}, "mode"),
        (torch.zeros(2, 4), {"eps": -1.0}, "eps"),
    ],
)
def test_argument_errors(rewards: torch.Tensor, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards, **kwargs)  # type: ignore[arg-type]

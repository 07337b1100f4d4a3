"""Accuracy figures of sampled completions: avg@k and the unbiased pass@k estimator."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

__all__ = ["avg_at_k", "pass_at_k", "mean_pass_at_k"]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples with c correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that at least one of k samples drawn without replacement from the n is right.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"correct count {num_correct} out of range for n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def mean_pass_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    """pass@k averaged over problems; ``correct[i]`` holds problem i's 0/1 scores."""
    if not correct:
        raise ValueError("no problems")
    total = 0.0
    for scores in correct:
        total += pass_at_k(len(scores), sum(1 for s in scores if s > 0.5), k)
    return total / len(correct)


def avg_at_k(correct: Sequence[Sequence[float]]) -> float:
    """Mean score over every sample of every problem (avg@k, which equals pass@1's estimate)."""
    num = sum(len(scores) for scores in correct)
    if num == 0:
        raise ValueError("no samples")
    return sum(sum(scores) for scores in correct) / num

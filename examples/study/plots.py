"""Plots of the entropy study: per-arm means over seeds with +-1 sd bands (matplotlib, PNG)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

Runs = dict[str, dict[int, dict[str, Any]]]  # arm -> seed -> run JSON


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over k steps (fewer at the start)."""
    return [_mean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def _band(
    ax: Any, runs: dict[int, dict[str, Any]], key: str, label: str, color: str, k: int
) -> None:
    curves = [smooth([h[key] for h in r["history"]], k) for r in runs.values()]
    length = min(len(c) for c in curves)
    steps = list(range(1, length + 1))
    mean = [_mean([c[i] for c in curves]) for i in range(length)]
    if len(curves) > 1:
        sd = [statistics.stdev([c[i] for c in curves]) for i in range(length)]
        lo = [m - s for m, s in zip(mean, sd, strict=True)]
        hi = [m + s for m, s in zip(mean, sd, strict=True)]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
    ax.plot(steps, mean, color=color, label=f"{label} (n={len(curves)})")


def plot(
    runs: Runs,
    out_dir: Path,
    arms: list[tuple[str, str, str]],
    window: tuple[int, int],
    smoothing: int,
    reward_levels: tuple[float, ...],
) -> list[Path]:
    """Entropy and reward over steps, and entropy against reward; ``arms`` is (name, label,
    colour) in legend order. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    present = [(n, label, c) for n, label, c in arms if n in runs]
    panels = (
        ("entropy", "token entropy (nats)", "entropy-study-entropy.png"),
        ("reward", "training reward", "entropy-study-reward.png"),
        ("tail_mass_all", "min-p tail mass 1 - Z at sampled tokens", "entropy-study-tail.png"),
    )
    for key, ylabel, name in panels:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for arm, label, color in present:
            _band(ax, runs[arm], key, label, color, smoothing)
        ax.axvspan(*window, color="k", alpha=0.05)
        ax.set_xlabel("step (shaded: the pre-registered entropy window)")
        ax.set_ylabel(f"{ylabel}\n{smoothing}-step mean, band +-1 sd over seeds", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for arm, label, color in present:
        for i, run in enumerate(runs[arm].values()):
            xs = smooth([h["reward"] for h in run["history"]], smoothing)
            ys = smooth([h["entropy"] for h in run["history"]], smoothing)
            ax.plot(xs, ys, color=color, alpha=0.6, linewidth=0.8, label=label if i == 0 else None)
    for level in reward_levels:
        ax.axvline(level, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"training reward ({smoothing}-step mean); dotted: matched-reward levels")
    ax.set_ylabel("token entropy (same smoothing)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = out_dir / "entropy-study-entropy-vs-reward.png"
    fig.savefig(name, dpi=110)
    plt.close(fig)
    written.append(name)
    return written

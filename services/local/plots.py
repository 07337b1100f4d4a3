"""PNG plots of a run's metrics log (reward, entropy, Lp-Reg statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Per-step values are noisy (one batch each); a trailing mean shows the trend.
SMOOTH_WINDOW = 20

PANELS = (
    (
        "reward.png",
        "Reward (mean of the step's rollouts)",
        [("reward_mean", "train reward"), ("eval_accuracy", "greedy eval accuracy")],
    ),
    ("entropy.png", "Policy entropy (nats/token)", [("entropy", "entropy")]),
    (
        "lpreg.png",
        "Lp-Reg",
        [("num_regularized", "regularised tokens"), ("num_candidates", "candidates")],
    ),
    (
        "loss.png",
        "Loss terms",
        [("loss", "loss"), ("loss_pg", "policy gradient"), ("loss_kl", "Lp-Reg KL")],
    ),
)


def write_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if len(pts) < SMOOTH_WINDOW * 2:
                ax.plot(xs, ys, marker="o", label=label)
                continue
            (line,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
            smooth = [
                sum(ys[max(0, i - SMOOTH_WINDOW + 1) : i + 1])
                / (i + 1 - max(0, i - SMOOTH_WINDOW + 1))
                for i in range(len(ys))
            ]
            ax.plot(
                xs, smooth, color=line.get_color(), label=f"{label} ({SMOOTH_WINDOW}-step mean)"
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

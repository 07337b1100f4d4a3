"""PNG plots of a run's metrics log (reward, entropy, Lp-Reg statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=label)
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

"""Entropy study: does Lp-Reg sustain exploration on the study task (examples/study)?

Each run trains the study policy with the learner's own Trainer (services/learner/trainer.py), in
process, fed by a simple synchronous sampler (full distribution at T = 1, like the generators):
one optimiser step per batch of prompt groups. The async arm samples with the weights of
``max_staleness`` versions ago (a constant, worst-case lag) instead of running generators.
After training, the final policy is evaluated on held-out prompts with `lpreg eval`'s code
(services/eval, hf backend). The pre-registered metrics are in docs/experiments/entropy-study.md.

    nice -n 15 .venv/bin/python benchmarks/study_entropy.py --jobs 2        # every arm, cached
    .venv/bin/python benchmarks/study_entropy.py --arms grpo lpreg --seeds 0 1
    .venv/bin/python benchmarks/study_entropy.py --aggregate-only            # JSON + plots again
    .venv/bin/python benchmarks/study_entropy.py --smoke --out-dir /tmp/s    # 2 steps, seconds

A run's result is cached as JSON under --runs-dir (one file per arm and seed); the summary JSON
and the plots go to --out-dir.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.config import LearnerConfig, RunConfig, load_config  # noqa: E402
from lpreg_core.loss import FILTERED_LOGIT, select_regularized  # noqa: E402
from lpreg_core.rewards import make_verifier  # noqa: E402
from lpreg_core.wire.lpreg.v1 import rollout_pb2  # noqa: E402
from services.eval.data import EvalProblem, FieldMap, load_problems  # noqa: E402
from services.eval.main import evaluate_model_dir  # noqa: E402
from services.eval.runner import EvalSettings  # noqa: E402

STUDY_DIR = REPO_ROOT / "examples" / "study"
sys.path.insert(0, str(STUDY_DIR))
from plots import plot, smooth  # noqa: E402
from sampler import KAPPA, Sampled, sample_groups  # noqa: E402
from task import STYLES, style_of  # noqa: E402

CONFIG = STUDY_DIR / "config.yaml"
EVAL_DATA = STUDY_DIR / "eval.jsonl"
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "experiments"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / "entropy-study"

# Pre-registered (docs/experiments/entropy-study.md, "Pre-registered metrics").
STEPS = 50
WINDOW = (11, 40)  # fixed step window for the mean entropy
LAST_STEPS = 10  # the last steps
REWARD_SMOOTHING_STEPS = 10  # moving average of the training reward for "matched reward"
# Entropy at the first step the smoothed reward reaches each level: the warm start's pass@1
# (0.111, examples/study/build.py's final evaluation) plus 0.05 and plus 0.10.
REWARD_LEVELS = (0.16, 0.21)
EVAL_PROMPTS = 256
EVAL_SAMPLES = 4
PRIMARY_SEEDS = (0, 1, 2, 3, 4)
SECONDARY_SEEDS = (0, 1, 2)
TOP_REG_TOKENS = 25

ENTROPY_BONUS_COEF = 0.01
OFF_POLICY_UPDATES = 4


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    staleness: int = 0
    needs_field: str | None = None  # a LearnerConfig field the arm needs (else it is not run)


ARMS = (
    Arm("grpo", "GRPO (clip 0.2)", ("learner.loss={type: grpo}",), PRIMARY_SEEDS),
    Arm("lpreg", "Lp-Reg, paper settings (beta 1)", (), PRIMARY_SEEDS),
    Arm(
        "lpreg_beta0", "Lp-Reg beta 0 (clip 1/9 only)", ("learner.loss.beta=0.0",), SECONDARY_SEEDS
    ),
    Arm("lpreg_beta4", "Lp-Reg beta 4", ("learner.loss.beta=4.0",), SECONDARY_SEEDS),
    Arm(
        "entropy_bonus",
        f"GRPO + entropy bonus {ENTROPY_BONUS_COEF}",
        (f"learner.loss={{type: entropy_bonus, entropy_coef: {ENTROPY_BONUS_COEF}}}",),
        SECONDARY_SEEDS,
    ),
    Arm(
        "lpreg_offpolicy",
        f"Lp-Reg, {OFF_POLICY_UPDATES} updates per step",
        (f"learner.updates_per_step={OFF_POLICY_UPDATES}",),
        SECONDARY_SEEDS,
        needs_field="updates_per_step",
    ),
    Arm(
        "lpreg_async",
        "Lp-Reg, max_staleness 2",
        ("learner.max_staleness=2",),
        SECONDARY_SEEDS,
        staleness=2,
    ),
)
ARMS_BY_NAME = {a.name: a for a in ARMS}
COLORS = {
    "grpo": "tab:red",
    "lpreg": "tab:blue",
    "lpreg_beta0": "tab:gray",
    "lpreg_beta4": "tab:purple",
    "entropy_bonus": "tab:green",
    "lpreg_offpolicy": "tab:brown",
    "lpreg_async": "tab:orange",
}


@dataclass
class Scale:
    """Sizes of one run (the study's, or the smoke test's)."""

    steps: int = STEPS
    prompts_per_step: int | None = None  # None: the config's
    num_samples: int | None = None
    eval_prompts: int = EVAL_PROMPTS
    eval_samples: int = EVAL_SAMPLES
    max_new_tokens: int | None = None
    window: tuple[int, int] = WINDOW
    last_steps: int = LAST_STEPS
    extra_overrides: list[str] = field(default_factory=list)


SMOKE = Scale(
    steps=2,
    prompts_per_step=2,
    num_samples=4,
    eval_prompts=4,
    eval_samples=2,
    max_new_tokens=24,
    window=(1, 2),
    last_steps=1,
)


def arm_available(arm: Arm) -> bool:
    return arm.needs_field is None or arm.needs_field in LearnerConfig.model_fields


def run_config(arm: Arm, seed: int, scale: Scale) -> RunConfig:
    overrides = [*arm.overrides, f"learner.steps={scale.steps}", f"learner.seed={seed}"]
    if scale.prompts_per_step is not None:
        overrides.append(f"learner.prompts_per_step={scale.prompts_per_step}")
    if scale.num_samples is not None:
        overrides.append(f"sampling.num_samples={scale.num_samples}")
    if scale.max_new_tokens is not None:
        overrides.append(f"sampling.max_new_tokens={scale.max_new_tokens}")
    overrides.extend(scale.extra_overrides)
    config = load_config(CONFIG, overrides)
    # Paths in the config are relative to the repository root.
    config.model.path = str(REPO_ROOT / config.model.path)  # absolute paths stay as they are
    return config


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def _make_trainer(model: torch.nn.Module, config: RunConfig) -> Any:
    from services.learner.trainer import Trainer

    return Trainer(model, config.learner)


def _token_records(
    groups: list[list[Sampled]], batch_advantages: torch.Tensor, config: RunConfig
) -> dict[str, Any]:
    """Which tokens Lp-Reg regularises, from the sampler's statistics (the same rule the trainer
    applies to its recomputed log-probs; equal to them on-policy), and their tail mass."""
    completions = [s for g in groups for s in g]
    width = batch_advantages.shape[1]
    logp = torch.zeros(len(completions), width, dtype=torch.float64)
    kept_mass = torch.ones_like(logp)
    kept = torch.zeros_like(logp, dtype=torch.bool)
    mask = torch.zeros_like(logp)
    for i, s in enumerate(completions):
        n = len(s.token_ids)
        logp[i, :n] = torch.tensor(s.logprobs, dtype=torch.float64)
        kept_mass[i, :n] = torch.tensor(s.kept_mass, dtype=torch.float64)
        kept[i, :n] = torch.tensor(s.kept)
        mask[i, :n] = 1.0
    proxy = torch.where(kept, logp - kept_mass.log(), torch.full_like(logp, FILTERED_LOGIT))
    loss = config.learner.loss
    rho_neg = getattr(loss, "rho_neg", 0.01)
    rho_pos = getattr(loss, "rho_pos", 0.0)
    beta = getattr(loss, "beta", 1.0)
    adv = batch_advantages.to(torch.float64)
    _, reg = select_regularized(logp, proxy, adv, mask, rho_neg=rho_neg, rho_pos=rho_pos)
    valid = mask > 0
    tail = (1.0 - kept_mass)[valid]
    return {
        "reg": reg,
        "num_reg": int(reg.sum()),
        "tail_mass_all": float(tail.mean()) if tail.numel() else math.nan,
        "reg_tail_mass": (1.0 - kept_mass[reg]).tolist(),
        "reg_bonus": (beta * (1.0 / kept_mass[reg] - 1.0)).tolist(),
        "reg_abs_adv": adv[reg].abs().tolist(),
        "reg_prob": logp[reg].exp().tolist(),
        "reg_tokens": [
            completions[i].token_ids[j] for i, j in zip(*reg.nonzero(as_tuple=True), strict=True)
        ],
    }


def _train_order(num: int, seed: int) -> list[int]:
    order = list(range(num))
    random.Random(f"entropy-study/{seed}").shuffle(order)
    return order


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def run_one(arm_name: str, seed: int, scale: Scale, runs_dir: Path, threads: int = 1) -> Path:
    """Train and evaluate one (arm, seed); write its JSON and return the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lpreg_core.config import JsonlTaskConfig
    from services.learner.trainer import build_batch

    torch.set_num_threads(threads)
    arm = ARMS_BY_NAME[arm_name]
    config = run_config(arm, seed, scale)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32)
    behaviour = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32)
    behaviour.eval()
    trainer = _make_trainer(model, config)
    task = config.task
    assert isinstance(task, JsonlTaskConfig)
    train = load_problems(
        REPO_ROOT / task.path,
        FieldMap(task.prompt_field, task.answer_field, task.prompt_template),
    )
    order = _train_order(len(train), seed)
    verifier = make_verifier(task.verifier)
    generator = torch.Generator().manual_seed(seed)
    snapshots: collections.deque[dict[str, torch.Tensor]] = collections.deque(
        maxlen=arm.staleness + 1
    )
    learner = config.learner
    num_samples = config.sampling.num_samples
    history: list[dict[str, Any]] = []
    reg_tail: list[float] = []
    reg_bonus: list[float] = []
    reg_adv: list[float] = []
    reg_prob: list[float] = []
    reg_tokens: collections.Counter[int] = collections.Counter()
    start_s = time.monotonic()
    for step in range(1, learner.steps + 1):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        # Version step-1 is current; the async arm samples with version max(0, step-1-lag).
        behaviour.load_state_dict(snapshots[0])
        base = (step - 1) * learner.prompts_per_step
        problems = [train[order[(base + i) % len(train)]] for i in range(learner.prompts_per_step)]
        prompt_ids = [list(tokenizer(p.prompt)["input_ids"]) for p in problems]
        groups = sample_groups(
            behaviour,
            prompt_ids,
            num_samples,
            config.sampling.max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            generator,
        )
        protos = []
        styles: collections.Counter[str] = collections.Counter()
        version = max(0, step - 1 - arm.staleness)
        for problem, ids, group in zip(problems, prompt_ids, groups, strict=True):
            proto = rollout_pb2.RolloutGroup(
                run_id=config.run_id,
                rollout_id=uuid.uuid4().hex,
                prompt_id=problem.prompt_id,
                prompt_token_ids=ids,
                issue_version=version,
            )
            for s in group:
                text = tokenizer.decode(s.token_ids, skip_special_tokens=True)
                styles[style_of(text)] += 1
                proto.completions.append(
                    rollout_pb2.Completion(
                        token_ids=s.token_ids,
                        logprobs=s.logprobs,
                        versions=[version] * len(s.token_ids),
                        reward=verifier.score(text, problem.answer),
                        text=text,
                    )
                )
            protos.append(proto)
        batch = build_batch(protos, learner.advantage_mode)
        records = _token_records(groups, batch.advantages, config)
        metrics = trainer.step(batch)
        total = sum(styles.values())
        row = {
            "step": step,
            "reward": float(metrics["reward_mean"]),
            "entropy": float(metrics["entropy"]),
            "num_regularized": float(metrics.get("num_regularized", 0.0)),
            "num_candidates": float(metrics.get("num_candidates", 0.0)),
            "num_reg_sampler": records["num_reg"],
            "loss_kl": float(metrics.get("loss_kl", 0.0)),
            "pg_clipfrac": float(metrics.get("pg_clipfrac", 0.0)),
            "grad_norm": float(metrics["grad_norm"]),
            "completion_len": float(metrics["completion_len_mean"]),
            "tail_mass_all": records["tail_mass_all"],
            "styles": {s: styles[s] / total for s in (*STYLES, "other")},
        }
        history.append(row)
        if records["num_reg"]:
            reg_tail.extend(records["reg_tail_mass"])
            reg_bonus.extend(records["reg_bonus"])
            reg_adv.extend(records["reg_abs_adv"])
            reg_prob.extend(records["reg_prob"])
            reg_tokens.update(records["reg_tokens"])
        if step % 25 == 0 or step == learner.steps:
            print(
                f"[{arm.name} s{seed}] step {step:4d} reward {row['reward']:.3f} "
                f"entropy {row['entropy']:.4f} reg {row['num_regularized']:.0f} "
                f"{time.monotonic() - start_s:6.0f}s",
                flush=True,
            )
    train_s = time.monotonic() - start_s
    runs_dir.mkdir(parents=True, exist_ok=True)
    model_dir = runs_dir / f"{arm.name}_s{seed}_model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    report = evaluate_final(config, model_dir, scale, seed)
    shutil.rmtree(model_dir, ignore_errors=True)
    result = {
        "arm": arm.name,
        "seed": seed,
        "steps": learner.steps,
        "vocab_size": int(model.config.vocab_size),
        "train_s": round(train_s, 1),
        "history": history,
        "eval": report,
        "regularized": {
            "count": len(reg_tail),
            "tail_mass": reg_tail,
            "bonus": reg_bonus,
            "abs_advantage": reg_adv,
            "prob": reg_prob,
            "top_tokens": [
                [tokenizer.convert_ids_to_tokens(t), n]
                for t, n in reg_tokens.most_common(TOP_REG_TOKENS)
            ],
        },
    }
    path = runs_dir / f"{arm.name}_s{seed}.json"
    path.write_text(json.dumps(result))
    return path


def evaluate_final(config: RunConfig, model_dir: Path, scale: Scale, seed: int) -> dict[str, Any]:
    problems: list[EvalProblem] = load_problems(EVAL_DATA, FieldMap(), scale.eval_prompts)
    settings = EvalSettings(
        num_samples=scale.eval_samples,
        temperature=1.0,
        max_new_tokens=config.sampling.max_new_tokens,
        greedy=True,
        prompts_per_call=8,
    )
    report = evaluate_model_dir(config, model_dir, problems, "math", settings, seed=10_000 + seed)
    return report.to_json()


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def run_metrics(run: dict[str, Any], scale: Scale) -> dict[str, float]:
    """The pre-registered per-run metrics."""
    history = run["history"]
    entropy = [h["entropy"] for h in history]
    reward = [h["reward"] for h in history]
    lo, hi = scale.window
    window = [h["entropy"] for h in history if lo <= h["step"] <= hi]
    out: dict[str, float] = {
        "entropy_first": entropy[0],
        "entropy_window": _mean(window),
        "entropy_last": _mean(entropy[-scale.last_steps :]),
        "reward_first": _mean(reward[: scale.last_steps]),
        "reward_last": _mean(reward[-scale.last_steps :]),
        "num_regularized_per_step": _mean([h["num_regularized"] for h in history]),
        "tail_mass_all_last": _mean([h["tail_mass_all"] for h in history][-scale.last_steps :]),
    }
    k = min(REWARD_SMOOTHING_STEPS, len(reward))
    smooth_reward = smooth(reward, k)
    smooth_entropy = smooth(entropy, k)
    for level in REWARD_LEVELS:
        hit = next((i for i, r in enumerate(smooth_reward) if r >= level and i >= k - 1), None)
        out[f"entropy_at_reward_{level}"] = math.nan if hit is None else smooth_entropy[hit]
        out[f"step_at_reward_{level}"] = math.nan if hit is None else float(hit + 1)
    ev = run["eval"]
    out["eval_greedy_accuracy"] = ev["greedy_accuracy"]
    out["eval_avg_at_k"] = ev["avg_at_k"]
    for kk, v in ev["pass_at"].items():
        out[f"eval_pass_at_{kk}"] = v
    out["eval_entropy"] = ev["entropy"]
    out["eval_response_tokens"] = ev["mean_response_tokens"]
    last = history[-scale.last_steps :]
    for style in (*STYLES, "other"):
        out[f"style_last_{style}"] = _mean([h["styles"][style] for h in last])
    shares = [out[f"style_last_{s}"] for s in (*STYLES, "other")]
    out["style_entropy_last"] = -sum(p * math.log(p) for p in shares if p > 0)
    reg = run["regularized"]
    out["reg_count"] = float(reg["count"])
    out["reg_tail_mass_mean"] = _mean(reg["tail_mass"])
    out["reg_bonus_mean"] = _mean(reg["bonus"])
    out["reg_abs_advantage_mean"] = _mean(reg["abs_advantage"])
    return out


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": _mean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else math.nan,
        "n": len(finite),
    }


def paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], key: str) -> dict:
    """b - a over the seeds both have: mean, sd of the differences, and mean / sd."""
    seeds = sorted(set(a) & set(b))
    diffs = [b[s][key] - a[s][key] for s in seeds]
    diffs = [d for d in diffs if math.isfinite(d)]
    mean = _mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {
        "n": len(diffs),
        "mean_diff": mean,
        "sd_diff": sd,
        "effect_size_dz": mean / sd if sd and math.isfinite(sd) and sd > 0 else math.nan,
        "t_stat": mean / (sd / math.sqrt(len(diffs))) if sd and sd > 0 else math.nan,
    }


def aggregate(runs_dir: Path, out_dir: Path, scale: Scale, tag: str, where: str) -> dict:
    runs: dict[str, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for path in sorted(runs_dir.glob("*_s*.json")):
        run = json.loads(path.read_text())
        runs[run["arm"]][run["seed"]] = run
    arms_out: dict[str, Any] = {}
    per_run: dict[str, dict[int, dict[str, float]]] = {}
    for arm in ARMS:
        if not arm_available(arm):
            arms_out[arm.name] = {
                "label": arm.label,
                "run": False,
                "why_not": f"learner.{arm.needs_field} does not exist in lpreg_core/config.py",
            }
            continue
        if arm.name not in runs:
            arms_out[arm.name] = {"label": arm.label, "run": False, "why_not": "not run yet"}
            continue
        metrics = {s: run_metrics(r, scale) for s, r in sorted(runs[arm.name].items())}
        per_run[arm.name] = metrics
        keys = next(iter(metrics.values())).keys()
        any_run = next(iter(runs[arm.name].values()))
        regs = [r["regularized"] for r in runs[arm.name].values()]
        top: collections.Counter[str] = collections.Counter()
        for r in regs:
            top.update({tok: n for tok, n in r["top_tokens"]})
        arms_out[arm.name] = {
            "label": arm.label,
            "run": True,
            "overrides": list(arm.overrides),
            "seeds": sorted(metrics),
            "vocab_size": any_run["vocab_size"],
            "steps": any_run["steps"],
            "where": where,
            "train_s_mean": _mean([r["train_s"] for r in runs[arm.name].values()]),
            "metrics": {k: _stats([m[k] for m in metrics.values()]) for k in keys},
            "per_seed": {str(s): m for s, m in metrics.items()},
            "regularized_top_tokens": top.most_common(TOP_REG_TOKENS),
        }
    comparisons: dict[str, Any] = {}
    keys_compared = (
        "entropy_window",
        "entropy_last",
        *(f"entropy_at_reward_{lv}" for lv in REWARD_LEVELS),
        "reward_last",
        "eval_greedy_accuracy",
        "eval_avg_at_k",
        f"eval_pass_at_{scale.eval_samples}",
        "style_entropy_last",
    )
    for other in (
        "lpreg",
        "lpreg_beta0",
        "lpreg_beta4",
        "entropy_bonus",
        "lpreg_async",
        "lpreg_offpolicy",
    ):
        if "grpo" in per_run and other in per_run:
            comparisons[f"{other}_minus_grpo"] = {
                k: paired(per_run["grpo"], per_run[other], k) for k in keys_compared
            }
    if "lpreg" in per_run and "lpreg_beta0" in per_run:
        comparisons["lpreg_minus_lpreg_beta0"] = {
            k: paired(per_run["lpreg_beta0"], per_run["lpreg"], k) for k in keys_compared
        }
    summary = {
        "study": tag,
        "task": "examples/study (word problems, BPE vocabulary, several solution paths)",
        "driver": "in-process learner Trainer + synchronous sampler (benchmarks/study_entropy.py)",
        "pre_registered": {
            "steps": scale.steps,
            "entropy_window": list(scale.window),
            "last_steps": scale.last_steps,
            "reward_smoothing_steps": REWARD_SMOOTHING_STEPS,
            "reward_levels": list(REWARD_LEVELS),
            "eval_prompts": scale.eval_prompts,
            "eval_samples": scale.eval_samples,
            "kappa_for_tail_mass": KAPPA,
        },
        "arms": arms_out,
        "comparisons": comparisons,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "entropy-study.json").write_text(json.dumps(_finite(summary), indent=1) + "\n")
    plot(
        runs,
        out_dir,
        [(a.name, a.label, COLORS[a.name]) for a in ARMS],
        scale.window,
        REWARD_SMOOTHING_STEPS,
        REWARD_LEVELS,
    )
    return summary


TABLE_COLUMNS = (
    ("entropy_window", "entropy, window", 4),
    ("entropy_last", "entropy, last", 4),
    ("reward_last", "train reward, last", 3),
    ("eval_greedy_accuracy", "greedy acc", 3),
    ("eval_avg_at_k", "avg@k", 3),
    ("eval_pass_at_4", "pass@4", 3),
    ("eval_entropy", "eval entropy", 3),
    ("eval_response_tokens", "resp. tokens", 1),
    ("num_regularized_per_step", "reg/step", 2),
    ("reg_tail_mass_mean", "1-Z at reg", 3),
    ("reg_bonus_mean", "bonus at reg", 3),
    ("style_entropy_last", "path entropy", 3),
)


def markdown_table(summary: dict[str, Any]) -> str:
    """The per-arm table of the doc: mean +- sd over seeds."""
    head = "| arm | seeds | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name, arm in summary["arms"].items():
        if not arm.get("run"):
            lines.append(f"| `{name}` | not run: {arm['why_not']} |" + " |" * len(TABLE_COLUMNS))
            continue
        cells = []
        for key, _, digits in TABLE_COLUMNS:
            stat = arm["metrics"].get(key, {"mean": math.nan, "std": math.nan})
            mean, sd = stat["mean"], stat["std"]
            if mean is None or not math.isfinite(mean):
                cells.append("-")
            elif sd is None or not math.isfinite(sd):
                cells.append(f"{mean:.{digits}f}")
            else:
                cells.append(f"{mean:.{digits}f} +- {sd:.{digits}f}")
        lines.append(f"| `{name}` | {len(arm['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(summary: dict[str, Any]) -> str:
    """Paired differences (arm - baseline) per seed: mean, sd, d_z, t, n."""
    lines = [
        "| comparison | metric | n | mean diff | sd of diffs | d_z | t |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in summary["comparisons"].items():
        for key, c in metrics.items():
            cells = [
                "-" if c[f] is None or not math.isfinite(c[f]) else f"{c[f]:+.4f}"
                for f in ("mean_diff", "sd_diff", "effect_size_dz", "t_stat")
            ]
            lines.append(f"| {name} | {key} | {c['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN and inf become null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


# Order of the runs, so that a study cut short still has what matters most: paired seeds of GRPO
# and Lp-Reg, then the dose-response's beta 4 and the positive control, then the rest. beta 0
# comes last: on-policy with one update per step the ratio is 1 wherever the gradient is taken,
# so the clip never binds and beta 0 is GRPO (the paired runs are identical until Lp-Reg first
# regularises a token).
PRIORITY = (
    *((arm, s) for s in (0, 1) for arm in ("grpo", "lpreg")),
    ("lpreg_beta4", 0),
    ("entropy_bonus", 0),
    *((arm, s) for s in (2, 3, 4) for arm in ("grpo", "lpreg")),
    ("lpreg_offpolicy", 0),
    ("lpreg_async", 0),
    *((arm, s) for s in (1, 2) for arm in ("lpreg_beta4", "entropy_bonus")),
    *((arm, s) for s in (1, 2) for arm in ("lpreg_offpolicy", "lpreg_async")),
    *(("lpreg_beta0", s) for s in (0, 1, 2)),
)


def _priority(arm: str, seed: int) -> tuple[int, int]:
    order = {job: i for i, job in enumerate(PRIORITY)}
    return (order.get((arm, seed), len(order)), seed)


def _run_job(job: tuple[str, int, Scale, Path]) -> str:
    arm, seed, scale, runs_dir = job
    return str(run_one(arm, seed, scale, runs_dir))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="*", choices=sorted(ARMS_BY_NAME), help="default: all")
    parser.add_argument("--seeds", nargs="*", type=int, help="default: the arm's seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--smoke", action="store_true", help="2 steps, tiny sizes, seed 0")
    parser.add_argument("--aggregate-only", action="store_true", help="no runs: JSON + plots")
    parser.add_argument("--force", action="store_true", help="rerun runs already cached")
    parser.add_argument("--where", default="cpu, 2 cores", help="recorded per arm in the JSON")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="extra config override"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = SMOKE if args.smoke else Scale()
    scale.extra_overrides = list(args.overrides)
    runs_dir = args.runs_dir
    if args.smoke:
        runs_dir = args.out_dir / "runs"
    arms = [ARMS_BY_NAME[a] for a in (args.arms or ([] if args.smoke else list(ARMS_BY_NAME)))]
    if args.smoke and not arms:
        arms = [ARMS_BY_NAME["grpo"], ARMS_BY_NAME["lpreg"]]
    jobs: list[tuple[str, int, Scale, Path]] = []
    if not args.aggregate_only:
        for arm in arms:
            if not arm_available(arm):
                print(f"skipping {arm.name}: learner.{arm.needs_field} does not exist", flush=True)
                continue
            seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else arm.seeds)
            for seed in seeds:
                cached = runs_dir / f"{arm.name}_s{seed}.json"
                if cached.exists() and not args.force:
                    continue
                jobs.append((arm.name, seed, scale, runs_dir))
    jobs.sort(key=lambda j: _priority(j[0], j[1]))
    if args.jobs > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for path in pool.map(_run_job, jobs):
                print(f"wrote {path}", flush=True)
    else:
        for job in jobs:
            print(f"wrote {_run_job(job)}", flush=True)
    summary = aggregate(
        runs_dir, args.out_dir, scale, "smoke" if args.smoke else "study", args.where
    )
    print(markdown_table(_finite(summary)))
    print(comparison_table(_finite(summary)))
    for name, arm in summary["arms"].items():
        if arm.get("run"):
            m = arm["metrics"]
            print(
                f"{name:16s} n={len(arm['seeds'])} entropy_window {m['entropy_window']['mean']:.4f}"
                f" +- {m['entropy_window']['std']:.4f}  greedy "
                f"{m['eval_greedy_accuracy']['mean']:.4f} +- {m['eval_greedy_accuracy']['std']:.4f}"
            )
        else:
            print(f"{name:16s} not run: {arm['why_not']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

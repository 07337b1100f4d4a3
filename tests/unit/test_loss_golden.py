"""Lp-Reg against the golden vectors produced by the authors' own functions (float64, CPU).

Every case the manifest lists is checked; a listed case whose file is missing fails. Floats must
agree within 1e-6, masks and counts exactly, including d loss / d logits_cur.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lpreg_core.loss import (
    TOKEN_MEAN_EPS,
    LpRegConfig,
    lp_reg_from_logits,
    policy_loss,
    token_stats_from_hidden,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "data" / "lpreg_golden"
MANIFEST = json.loads((GOLDEN_DIR / "manifest.json").read_text())
CASES = MANIFEST["cases"]
ATOL = 1e-6
CONFIG_KEYS = (
    "kappa",
    "threshold_mode",
    "rho_neg",
    "rho_pos",
    "beta",
    "clip_low",
    "clip_high",
    "temperature",
    "loss_agg_mode",
)
# Debug prints of the reference, checked separately against our per-branch counts.
BRANCH_COUNT_ARRAYS = ("ref_selected_counts", "ref_reg_counts")


def _load(case: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / case["file"]) as data:
        return {name: data[name] for name in data.files}


def _config(case: dict[str, Any], **overrides: Any) -> LpRegConfig:
    return LpRegConfig(**{key: case[key] for key in CONFIG_KEYS}, **overrides)


def _inputs(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        "logits": torch.tensor(arrays["logits_cur"], requires_grad=True),
        "old_logits": torch.tensor(arrays["logits_old"]),
        "tokens": torch.tensor(arrays["tokens"]),
        "advantages": torch.tensor(arrays["advantages"]),
        "response_mask": torch.tensor(arrays["response_mask"]),
    }


def _assert_matches(name: str, got: torch.Tensor, want: np.ndarray) -> None:
    got_np = got.detach().cpu().numpy()
    assert got_np.shape == want.shape, f"{name}: shape {got_np.shape} != {want.shape}"
    if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        mismatched = np.argwhere(got_np.astype(want.dtype) != want)
        assert mismatched.size == 0, f"{name}: differs at {mismatched[:10].tolist()}"
    else:
        err = np.abs(got_np.astype(np.float64) - want.astype(np.float64))
        assert np.all(np.isfinite(got_np)), f"{name}: non-finite values"
        assert err.max(initial=0.0) <= ATOL, f"{name}: max abs error {err.max():.3e} > {ATOL}"


def _branch_counts(
    arrays: dict[str, np.ndarray], candidate: torch.Tensor, reg: torch.Tensor, cfg: LpRegConfig
) -> tuple[list[int], list[int]]:
    """(selected, regularised) per branch that ran, positive branch first, like the reference."""
    valid = arrays["response_mask"] > 0
    adv = arrays["advantages"]
    selected, regularised = [], []
    for branch, rho in ((valid & (adv > 0), cfg.rho_pos), (valid & (adv < 0), cfg.rho_neg)):
        n = int(branch.sum())
        if n == 0 or max(1, int(n * rho)) <= 1:
            continue
        in_branch = torch.from_numpy(branch)
        selected.append(int((candidate & in_branch).sum()))
        regularised.append(int((reg & in_branch).sum()))
    return selected, regularised


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_lp_reg_from_logits_matches_reference(case: dict[str, Any]) -> None:
    arrays = _load(case)
    inputs = _inputs(arrays)
    cfg = _config(case)
    out = lp_reg_from_logits(config=cfg, **inputs)
    out["loss"].backward()
    assert inputs["logits"].grad is not None

    checked = 0
    for name, spec in MANIFEST["arrays"].items():
        if spec["kind"] != "reference" or name in BRANCH_COUNT_ARRAYS:
            continue
        assert name in arrays, f"{case['name']}: manifest array {name} missing from the file"
        if name == "grad_logits_cur":
            got = inputs["logits"].grad
        elif name == "proxy_probs":
            got = out["proxy_log_probs"].exp()
        else:
            assert name in out, f"LossOutput has no {name}"
            got = out[name]
        _assert_matches(name, got, arrays[name])
        checked += 1
    assert checked >= 20

    selected, regularised = _branch_counts(arrays, out["candidate_mask"], out["reg_mask"], cfg)
    assert selected == arrays["ref_selected_counts"].tolist()
    assert regularised == arrays["ref_reg_counts"].tolist()

    summary = case["summary"]
    assert int(out["num_valid_tokens"]) == summary["n_valid"]
    assert int(out["num_candidates"]) == summary["n_candidates"]
    assert int(out["num_regularized"]) == summary["n_regularised"]
    assert int(out["num_kl_clamped"]) == summary["n_kl_clamped"]
    for key in ("loss", "loss_pg", "loss_kl", "pg_clipfrac", "ppo_kl"):
        assert abs(float(out[key].detach()) - summary[key]) <= ATOL, key


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_policy_loss_with_micro_batch_ranking_matches_reference(case: dict[str, Any]) -> None:
    """The learner's entry point, fed the reference's denominators, reproduces loss and gradient."""
    arrays = _load(case)
    inputs = _inputs(arrays)
    cfg = _config(case, ranking="micro_batch")
    ref = lp_reg_from_logits(config=cfg, **{**inputs, "logits": inputs["logits"].detach()})
    log_probs = ref["log_probs"].detach().requires_grad_()
    mask = inputs["response_mask"]
    if cfg.loss_agg_mode == "token-mean":
        num_tokens = float(mask.sum()) + TOKEN_MEAN_EPS
    else:
        num_tokens = float(mask.shape[0])
    loss, metrics = policy_loss(
        log_probs,
        ref["old_log_probs"],
        ref["proxy_log_probs"],
        inputs["advantages"],
        mask,
        config=cfg,
        num_tokens=num_tokens,
    )
    loss.backward()
    assert log_probs.grad is not None
    # Chain rule through log_softmax by hand: d loss / d z = g (onehot - softmax(z)) per position.
    logits = inputs["logits"].detach()
    onehot = torch.nn.functional.one_hot(inputs["tokens"], logits.shape[-1]).to(logits.dtype)
    grad_logits = log_probs.grad.unsqueeze(-1) * (onehot - torch.softmax(logits, dim=-1))
    _assert_matches("grad_logits_cur", grad_logits, arrays["grad_logits_cur"])
    _assert_matches("loss", loss, arrays["loss"])
    _assert_matches("loss_pg", metrics["loss_pg"], arrays["loss_pg"])
    _assert_matches("loss_kl", metrics["loss_kl"], arrays["loss_kl"])
    assert int(metrics["num_candidates"]) == case["summary"]["n_candidates"]
    assert int(metrics["num_regularized"]) == case["summary"]["n_regularised"]
    if cfg.loss_agg_mode == "token-mean":
        _assert_matches("pg_clipfrac", metrics["pg_clipfrac"], arrays["pg_clipfrac"])
        _assert_matches("ppo_kl", metrics["ppo_kl"], arrays["ppo_kl"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fused_path_matches_reference(case: dict[str, Any]) -> None:
    """token_stats_from_hidden with hidden = logits and an identity head is the reference."""
    arrays = _load(case)
    inputs = _inputs(arrays)
    cfg = _config(case, ranking="micro_batch")
    batch, length, vocab = arrays["logits_cur"].shape
    eye = torch.eye(vocab, dtype=torch.float64)
    hidden = inputs["logits"].detach().reshape(-1, vocab).requires_grad_()
    tokens = inputs["tokens"].reshape(-1)
    stat_kwargs = {
        "temperature": cfg.temperature,
        "proxy": cfg.proxy_filter,
        "chunk_size": 5,
    }
    cur = token_stats_from_hidden(hidden, eye, tokens, **stat_kwargs)
    with torch.no_grad():
        old = token_stats_from_hidden(
            inputs["old_logits"].reshape(-1, vocab), eye, tokens, **stat_kwargs
        )
    mask = inputs["response_mask"]
    num_tokens = (
        float(mask.sum()) + TOKEN_MEAN_EPS if cfg.loss_agg_mode == "token-mean" else float(batch)
    )
    loss, _ = policy_loss(
        cur.log_probs.reshape(batch, length),
        old.log_probs.reshape(batch, length),
        old.proxy_log_probs.reshape(batch, length),
        inputs["advantages"],
        mask,
        config=cfg,
        num_tokens=num_tokens,
    )
    loss.backward()
    assert hidden.grad is not None
    _assert_matches("loss", loss, arrays["loss"])
    _assert_matches(
        "grad_logits_cur", hidden.grad.reshape(batch, length, vocab), arrays["grad_logits_cur"]
    )
    for name, got in (
        ("log_probs", cur.log_probs),
        ("entropy", cur.entropy),
        ("old_log_probs", old.log_probs),
        ("proxy_log_probs", old.proxy_log_probs),
        ("proxy_keep_count", old.proxy_keep_count),
    ):
        _assert_matches(name, got.reshape(batch, length), arrays[name])


def test_every_manifest_case_has_its_file() -> None:
    missing = [c["file"] for c in CASES if not (GOLDEN_DIR / c["file"]).is_file()]
    assert not missing, f"golden files listed in the manifest but missing: {missing}"
    assert len(CASES) >= 6

"""The FSDP2 learner across real processes (torchrun, Gloo, CPU, float64, the tiny model):
2 and 4 ranks give the step one process gives, Lp-Reg's ranking included, one-update steps in
one pass and through the statistics pass, and a sharded
checkpoint written by 2 ranks resumes on 4 ranks and in one plain process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_worker import fresh_model, load_groups, make_groups, save_groups
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from lpreg_core.config import LearnerConfig
from lpreg_core.loss import select_regularized
from services.learner.checkpoint import ShardedCheckpointer, is_sharded, latest_checkpoint
from services.learner.distributed import plan_rows
from services.learner.trainer import Trainer, _split, build_batch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_dist_worker.py")
TOL = 1e-6
LP_REG = {"type": "lp_reg", "rho_neg": 0.15, "kappa": 1e-3}
ONE_UPDATE = {
    "prompts_per_step": 4,
    "micro_batch_sequences": 3,
    "max_staleness": 0,
    "optimizer": {"lr": 1e-3},
    "loss": LP_REG,
}
CASES: list[dict[str, Any]] = [
    {"name": "lp_reg", "learner": ONE_UPDATE},
    # The same step through the statistics pass the several-update path runs first.
    {"name": "lp_reg_two_pass", "single_pass": False, "learner": ONE_UPDATE},
    {
        # One update, decoupled masking (the denominator is known only after every rank's
        # forwards), two sequences per micro-batch.
        "name": "lp_reg_decoupled",
        "learner": {
            "prompts_per_step": 4,
            "micro_batch_sequences": 2,
            "max_staleness": 1,
            "off_policy": {"type": "decoupled", "cap": 4.0},
            "optimizer": {"lr": 1e-3},
            "loss": {**LP_REG, "rho_neg": 0.3},
        },
    },
    {
        # Two mini-batches (two optimiser updates), one sequence per micro-batch (ranks run
        # different numbers of real micro-batches), truncated importance weights against the
        # behaviour log-probs, activation checkpointing.
        "name": "lp_reg_two_updates",
        "activation_checkpointing": True,
        "learner": {
            "prompts_per_step": 4,
            "micro_batch_sequences": 1,
            "updates_per_step": 2,
            "max_staleness": 1,
            "off_policy": {"type": "tis"},
            "optimizer": {"lr": 1e-3},
            "loss": LP_REG,
        },
    },
]


def torchrun(nproc: int, spec: dict[str, Any]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun_bin), "--standalone", f"--nproc-per-node={nproc}", str(WORKER)]
    proc = subprocess.run(
        [*cmd, json.dumps(spec)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"torchrun with {nproc} ranks failed:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 ranks run every case and save a checkpoint after the last (activation checkpointing
    on); 4 ranks run every case and resume from that checkpoint (without it)."""
    base = tmp_path_factory.mktemp("fsdp")
    groups = base / "groups.json"
    save_groups(make_groups(), groups)
    checkpoints = base / "checkpoints"
    out = {"groups": groups, "checkpoints": checkpoints}
    for nproc in (2, 4):
        out[str(nproc)] = base / f"ranks{nproc}"
        spec: dict[str, Any] = {"cases": CASES, "groups": str(groups), "out": str(out[str(nproc)])}
        spec["save" if nproc == 2 else "load"] = str(checkpoints)
        torchrun(nproc, spec)
    return out


_ONE_PROCESS: dict[str, tuple[dict[str, float], torch.nn.Module]] = {}


def one_process(case: dict[str, Any], groups: Path) -> tuple[dict[str, float], torch.nn.Module]:
    """Today's single-process Trainer on the same batch (computed once per case)."""
    if case["name"] not in _ONE_PROCESS:
        model = fresh_model()
        trainer = Trainer(model, LearnerConfig.model_validate(case["learner"]))
        trainer.single_pass = case.get("single_pass", True)
        stats = trainer.step(build_batch(load_groups(str(groups)), "std"))
        _ONE_PROCESS[case["name"]] = stats, model
    return _ONE_PROCESS[case["name"]]


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ranks_give_the_one_process_step(
    runs: dict[str, Path], nproc: int, case: dict[str, Any]
) -> None:
    stats, model = one_process(case, runs["groups"])
    where = runs[str(nproc)] / case["name"]
    sharded = json.loads((where / "stats.json").read_text())
    assert sorted(sharded) == sorted(stats)
    for key, value in stats.items():
        assert sharded[key] == pytest.approx(value, abs=TOL), key
    # Lp-Reg acted: candidates were ranked and some tokens regularised.
    assert stats["num_candidates"] > 1 and stats["num_regularized"] > 0
    grads = load_file(str(where / "grads.safetensors"))
    params = load_file(str(where / "params.safetensors"))
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(grads[name], p.grad, atol=TOL, rtol=0)
        torch.testing.assert_close(params[name], p.detach(), atol=TOL, rtol=0)


@pytest.mark.parametrize("nproc", [2, 4])
def test_ranking_per_rank_would_differ(runs: dict[str, Path], nproc: int) -> None:
    """The test above can tell a step-wide ranking from a per-rank one: on this batch, ranking
    each rank's rows alone picks other candidates than ranking the step."""
    batch = build_batch(load_groups(str(runs["groups"])), "std")
    trainer = Trainer(fresh_model(), LearnerConfig.model_validate(CASES[0]["learner"]))
    proxy_filter = trainer.loss_config.proxy_filter
    with torch.no_grad():
        proximal, _, proxy = trainer._token_stats(
            batch, slice(0, len(batch.sequences)), proxy_filter
        )
    assert proxy is not None
    step_wide, _ = select_regularized(
        proximal, proxy, batch.advantages, batch.mask, rho_neg=LP_REG["rho_neg"], rho_pos=0.0
    )
    per_rank = torch.zeros_like(step_wide)
    [plan] = plan_rows([len(s) for s in batch.sequences], _split(len(batch.sequences), 1), nproc)
    for rows in plan:
        index = torch.tensor(rows)
        chosen, _ = select_regularized(
            proximal[index], proxy[index], batch.advantages[index], batch.mask[index],
            rho_neg=LP_REG["rho_neg"], rho_pos=0.0,
        )  # fmt: skip
        per_rank[index] = chosen
    assert not torch.equal(per_rank, step_wide)


def test_plan_balances_tokens() -> None:
    lengths = [9, 1, 1, 1, 5, 4, 3, 8]
    [plan] = plan_rows(lengths, [slice(0, 8)], 2)
    assert sorted(r for part in plan for r in part) == list(range(8))
    loads = [sum(lengths[r] for r in part) for part in plan]
    assert loads == [16, 16]
    # More ranks than rows: some ranks get none, every row is somewhere exactly once.
    plans = plan_rows([3, 2, 7], [slice(0, 1), slice(1, 3)], 4)
    assert [sorted(r for part in mini for r in part) for mini in plans] == [[0], [1, 2]]


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    options = StateDictOptions(full_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    out = {f"model.{k}": v for k, v in model_sd.items()}
    for name, entry in optim_sd["state"].items():
        for key, value in entry.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value).reshape(-1)
    return out


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    assert any(k.endswith(".exp_avg_sq") for k in want), "the optimiser state was saved"
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_checkpoint_from_2_ranks_resumes_on_4(runs: dict[str, Path]) -> None:
    path = latest_checkpoint(runs["checkpoints"])
    assert path is not None and is_sharded(path)
    saved = load_file(str(runs["2"] / "saved" / "state.safetensors"))
    loaded = load_file(str(runs["4"] / "loaded" / "state.safetensors"))
    _assert_same_state(loaded, saved)
    loop = json.loads((runs["4"] / "loaded" / "loop.json").read_text())
    assert loop == {"step": 7, "lr": 1e-3, "version": 7, "marker": "saved"}


def test_checkpoint_from_2_ranks_resumes_in_one_process(runs: dict[str, Path]) -> None:
    saved = load_file(str(runs["2"] / "saved" / "state.safetensors"))
    model = fresh_model()
    trainer = Trainer(model, LearnerConfig.model_validate(CASES[-1]["learner"]))
    checkpointer = ShardedCheckpointer(
        runs["checkpoints"], model, trainer.optimizer, trainer.scheduler, keep_last=2
    )
    restored = checkpointer.restore()
    assert restored is not None
    step, loop = restored
    assert (step, loop) == (7, {"version": 7, "marker": "saved"})
    _assert_same_state(_full_state(model, trainer.optimizer), saved)
    # The resumed single process trains on from the restored weights and optimiser state.
    before = copy.deepcopy(model.state_dict())
    trainer.step(build_batch(load_groups(str(runs["groups"])), "std"))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

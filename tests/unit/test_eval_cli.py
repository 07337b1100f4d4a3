"""`lpreg eval` end to end on the tiny model (hf backend): a Hugging Face dir and a learner
checkpoint of the same weights give the same report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lpreg_core.tasks import make_problems
from services.cli import main as cli_main
from services.eval.checkpoint import find_learner_checkpoint, materialize_checkpoint
from services.learner.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
TINY_MODEL = ROOT / "examples" / "tiny" / "model"
NUM_PROBLEMS = 12
NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny_eval.jsonl"
    rows = [
        {"prompt": p.prompt, "answer": p.answer} for p in make_problems("eval", NUM_PROBLEMS, 0)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _eval(checkpoint: Path, data: Path, out: Path, *extra: str) -> dict:
    code = cli_main(
        [
            "eval",
            str(TINY_CONFIG),
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
            "--num-samples",
            str(NUM_SAMPLES),
            "--seed",
            "7",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def _perturbed_tiny() -> torch.nn.Module:
    """The tiny model with its MLPs rescaled: weights that differ from examples/tiny/model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.down_proj" in name:
                param.mul_(1.5)
    return model


def test_eval_of_the_tiny_model_reports_every_figure(data_file: Path, tmp_path: Path) -> None:
    report = _eval(TINY_MODEL, data_file, tmp_path / "r.json")
    assert report["num_problems"] == NUM_PROBLEMS
    assert report["num_samples"] == NUM_SAMPLES
    assert set(report["pass_at"]) == {"1", "2", "4"}
    assert report["pass_at"]["1"] == pytest.approx(report["avg_at_k"])
    values = [report["pass_at"][k] for k in ("1", "2", "4")]
    assert values == sorted(values)  # pass@k never falls with k
    for key in ("avg_at_k", "greedy_accuracy", "finished_rate"):
        assert 0.0 <= report[key] <= 1.0
    # The tiny model is warm-started to be right on about half of the problems (README).
    assert report["greedy_accuracy"] > 0.0
    assert 1.0 <= report["mean_response_tokens"] <= 8.0
    assert math.isfinite(report["entropy"]) and report["entropy"] > 0.0
    assert report["meta"]["backend"] == "hf"


def test_learner_checkpoint_and_hf_dir_of_the_same_weights_agree(
    data_file: Path, tmp_path: Path
) -> None:
    model = _perturbed_tiny()
    hf_dir = tmp_path / "final_model"
    model.save_pretrained(hf_dir)
    for item in TINY_MODEL.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            (hf_dir / item.name).write_bytes(item.read_bytes())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    root = tmp_path / "run" / "checkpoints"
    step_dir = save_checkpoint(root, 3, model, optimizer, scheduler, {"version": 3}, keep_last=2)
    assert find_learner_checkpoint(tmp_path / "run") == step_dir

    from_hf = _eval(hf_dir, data_file, tmp_path / "hf.json")
    for source in (step_dir, root, tmp_path / "run"):
        from_ckpt = _eval(source, data_file, tmp_path / "ckpt.json")
        from_ckpt.pop("meta"), from_hf.pop("meta", None)
        assert from_ckpt == from_hf
    base = _eval(TINY_MODEL, data_file, tmp_path / "base.json")
    base.pop("meta")
    # The perturbed weights were really loaded: the base model samples something else.
    assert base != from_hf


def test_materialized_checkpoint_loads_with_transformers(tmp_path: Path) -> None:
    model = _perturbed_tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    step_dir = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep_last=1)
    with materialize_checkpoint(step_dir, str(TINY_MODEL), "float32") as path:
        assert (path / "tokenizer.json").is_file()
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for (name, a), (_, b) in zip(
            model.state_dict().items(), loaded.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert not path.exists()  # the temporary directory is gone after the block


def test_eval_errors_are_one_line_and_exit_1(
    data_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = cli_main(
        [
            "eval",
            str(TINY_CONFIG),
            "--checkpoint",
            str(tmp_path / "empty"),
            "--data",
            str(data_file),
        ]
    )
    assert code == 1
    assert "neither a Hugging Face model directory" in capfd.readouterr().err
    code = cli_main(
        ["eval", str(TINY_CONFIG), "--checkpoint", str(TINY_MODEL), "--data", "nope.jsonl"]
    )
    assert code == 1
    assert "evaluation data not found" in capfd.readouterr().err

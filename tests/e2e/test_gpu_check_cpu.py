"""benchmarks/gpu_check.py runs every part on the CPU (--quick shapes, bf16 autocast) and writes
the JSON the GPU run writes: every field present, every figure finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_gpu_check_quick_on_cpu_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [
            *(sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"),
            *("--compute-dtype", "bfloat16", "--repeats", "2", "--out", str(out)),
            *("--e2e-dir", str(tmp_path / "e2e")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OUT": str(tmp_path / "device-out")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads((tmp_path / "device-out" / "gpu-check.json").read_text()) == report

    env = report["environment"]
    for key in ("device_type", "device_name", "torch", "python", "transformers"):
        assert env[key], key
    assert env["triton"] or env["triton_reason"]

    correctness = report["correctness"]
    assert correctness["ok"] is True
    assert [r["loss_type"] for r in correctness["losses"]] == ["lp_reg", "grpo"]
    for r in correctness["losses"]:
        assert r["compute_dtype"] == "bfloat16" and r["master_dtype"] == "float32"
        for key in ("loss", "loss_reference", "loss_abs_diff", "loss_rel_diff",
                    "grad_max_abs_diff", "grad_rel_diff", "grad_worst_param_rel_diff"):  # fmt: skip
            assert finite(r[key]), (key, r[key])
        # bf16 compute differs from the float64 reference, but not by much.
        assert 0 < r["grad_rel_diff"] <= r["grad_rel_tolerance"]
    lp_reg = correctness["losses"][0]
    assert lp_reg["num_regularized_reference"] > 0, "the Lp-Reg term is not in the compared step"

    speed = report["speed"]
    assert speed["ok"] is True, speed
    for key in ("num_params", "num_tokens", "step_s", "tokens_per_s", "bare_forward_backward_s",
                "step_over_bare_forward_backward"):  # fmt: skip
        assert finite(speed[key]) and speed[key] > 0, (key, speed[key])
    assert speed["num_tokens"] == speed["num_sequences"] * speed["sequence_len"]
    # No GPU: MFU and peak memory are absent, each with the reason.
    assert speed["mfu"] is None and speed["mfu_reason"]
    assert speed["peak_memory_bytes"] is None and speed["peak_memory_reason"]

    e2e = report["end_to_end"]
    assert e2e["ok"] is True, e2e
    assert e2e["steps"] == 2 and e2e["policy_version"] == 2
    assert e2e["generator_weight_versions"] == {"gen-0": 2, "gen-1": 2}

    fsdp = report["fsdp2"]
    assert fsdp["ok"] is True, fsdp
    assert (fsdp["world_size"], fsdp["backend"]) == (1, "gloo")
    assert fsdp["step"]["compute_dtype"] == "bfloat16"
    assert fsdp["step"]["num_regularized"] > 0, "the Lp-Reg term is not in the sharded step"
    assert 0 <= fsdp["step"]["grad_rel_diff"] <= fsdp["step"]["grad_rel_tolerance"]
    assert fsdp["checkpoint"] == {**fsdp["checkpoint"], "restored_step": 1, "ok": True}
    assert not fsdp["checkpoint"]["tensors_not_bit_identical"]
    assert finite(fsdp["speed"]["tokens_per_s"])

    loss = report["kernel"]
    assert loss["ok"] is True, loss
    for size in loss["sizes"]:
        assert finite(loss[str(size)]["project_ms"]), loss[str(size)]

    assert report["nccl_broadcast"]["ran"] is False and "NCCL" in report["nccl_broadcast"]["why"]
    assert finite(report["wall_s"])

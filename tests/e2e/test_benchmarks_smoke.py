"""Every benchmark of `make bench` at its smallest size (--smoke), all at once in parallel: each
must exit 0 and print one JSON object whose figures exist and are finite. bench_lpreg_loss
--smoke runs its CUDA mode's code path on CPU under Triton's interpreter; its JSON must have the
issue's shape. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 280

REDIS = shutil.which("redis-server") is not None

FIELDS = {
    "bench_async": (
        "sync_s_per_step",
        "async_s_per_step",
        "speedup",
        "sync_wasted_fraction",
        "async_wasted_fraction",
        "sync_final_reward",
        "async_final_reward",
    ),
    "bench_weight_sync": ("project_s", "raw_s", "efficiency", "pause_s"),
    "bench_transport": ("groups_per_s", "raw_groups_per_s", "ratio"),
    "bench_learner": ("tokens_per_s", "bare_tokens_per_s", "ratio"),
}
LOSS_SIZE_FIELDS = {
    "naive_ms",
    "project_ms",
    "liger_ms",
    "project_extra_gb",
    "liger_extra_gb",
    "time_ratio_vs_liger",
    "mem_ratio_vs_liger",
    "max_abs_err_vs_float64",
}
NEEDS_REDIS = {"bench_async", "bench_transport"}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SMOKE_TIMEOUT_S + 20)]


@pytest.fixture(scope="module")
def reports() -> Iterator[dict[str, tuple[int, str, str]]]:
    """Each benchmark's (exit code, stdout, stderr tail), all started together."""
    names = [*FIELDS, "bench_lpreg_loss"]
    if not REDIS:
        names = [n for n in names if n not in NEEDS_REDIS]
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        procs = {}
        for name in names:
            out = (Path(tmp) / f"{name}.out").open("w+")
            err = (Path(tmp) / f"{name}.err").open("w+")
            proc = subprocess.Popen(
                [sys.executable, f"benchmarks/{name}.py", "--smoke"],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env={**os.environ, "TMPDIR": tmp},
            )
            procs[name] = (proc, out, err)
        results = {}
        for name, (proc, out, err) in procs.items():
            try:
                code = proc.wait(timeout=SMOKE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            out.seek(0)
            err.seek(0)
            results[name] = (code, out.read(), err.read()[-4000:])
            out.close()
            err.close()
        yield results


def report_of(reports: dict[str, tuple[int, str, str]], name: str) -> dict[str, Any]:
    code, stdout, stderr = reports[name]
    assert code == 0, f"{name} --smoke exited {code}:\n{stderr}"
    report = json.loads(stdout)
    assert isinstance(report, dict)
    return report


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.parametrize("name", list(FIELDS))
def test_benchmark_figures_exist_and_are_finite(
    reports: dict[str, tuple[int, str, str]], name: str
) -> None:
    if name in NEEDS_REDIS and not REDIS:
        pytest.skip("needs redis-server on PATH")
    report = report_of(reports, name)
    for field in FIELDS[name]:
        assert field in report, f"{name}: no {field!r} in {sorted(report)}"
        assert finite(report[field]), f"{name}: {field} = {report[field]!r}"


def test_loss_benchmark_cuda_json_has_the_issues_shape(
    reports: dict[str, tuple[int, str, str]],
) -> None:
    report = report_of(reports, "bench_lpreg_loss")
    assert report["device"] == "cpu"
    assert report["triton_interpreter"] is True
    assert report["sizes"] and all(isinstance(n, int) for n in report["sizes"])
    for n in report["sizes"]:
        figures = report[str(n)]
        assert set(figures) == LOSS_SIZE_FIELDS
        assert finite(figures["naive_ms"]) and finite(figures["project_ms"])
        for key, value in figures.items():
            if key == "max_abs_err_vs_float64":
                assert {"naive", "project"} <= set(value)
                assert all(finite(v) for v in value.values())
            else:
                # null where a path cannot run here (Liger and peak memory need CUDA)
                assert value is None or finite(value), f"{n}: {key} = {value!r}"
        assert report["detail"][str(n)]["project_backend"] == "triton"
    assert set(report["goals_met"]) == {
        "time_le_1.3x_liger",
        "time_below_naive",
        "mem_le_2.0x_liger",
    }

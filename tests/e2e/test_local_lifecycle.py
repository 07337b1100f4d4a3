"""`lpreg local` as a newcomer meets it: resume, Ctrl-C, a killed launcher, failed starts,
start-up checks, and the run folder it leaves (final_model, TensorBoard events, summary)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from localrun import ROOT, run_local

SHORT = (
    "learner.steps=2",
    "learner.prompts_per_step=4",
    "learner.eval_every_steps=2",
    "learner.eval_prompts=8",
    "learner.checkpoint.every_steps=1",
)
# Generous bounds for a loaded 2-core machine; never asserted as timings.
WAIT_S = 240.0


def _local(run_dir: Path, *overrides: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "services.cli", "local", "examples/tiny/config.yaml", *extra]
    for o in (f"local.run_dir={run_dir}", *overrides):
        argv += ["--set", o]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, f"launcher exited before {what}: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S}s"
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_run_then_resume_from_its_own_redis_data(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_local(run_dir, *SHORT)
    assert first["completed"] is True and first["steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The pre-training evaluation is step 0 of the log (and so of the table and the plots).
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]
    assert first["eval_accuracy_start"] == rows[0]["eval_accuracy"]
    proc = _local(run_dir, *SHORT, "learner.steps=3", "local.progress=false", extra=("--resume",))
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    assert "finished 3/3 steps" in out and str(run_dir) in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["steps"] == 3
    # The ledger came back from the run's own append-only file: nothing issued twice, no loss.
    assert summary["prompts_unaccounted"] == 0
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "resumed at step 2" in log and "issuer state from the transport" in log


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_final_model_is_a_complete_hf_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    run_local(run_dir, *SHORT)
    final = run_dir / "final_model"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tok("23+58=", return_tensors="pt")
    assert ids.input_ids.shape[1] > 1  # a real tokenizer, not an empty one
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.input_ids.shape[1]
    gen = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", str(final), "23+58=", "-n", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    assert [line[:10] for line in gen.stdout.splitlines()] == ["[0] 23+58=", "[1] 23+58="]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_ctrl_c_writes_a_summary_that_says_not_completed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _local(run_dir, *SHORT, "learner.steps=500", "learner.eval_every_steps=0")
    _wait_for(run_dir / "checkpoints" / "latest", proc, "a first checkpoint")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False
    assert "--resume" in summary["reason"] and "of 500" in summary["reason"]
    assert "NOT finished" in out


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigkilled_launcher_leaves_no_children(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _local(run_dir, *SHORT, "learner.steps=500", "learner.eval_every_steps=0")
    _wait_for(run_dir / "logs" / "gen-1.log", proc, "the generators")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 4  # redis-server, learner, two generators
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.info if hasattr(p, "info") else p for p in alive]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LPREG_AUTH_TOKEN": "t0ken", **(env or {})},
    )


def test_missing_model_is_refused_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = _cli(
        "local",
        "examples/tiny/config.yaml",
        "--set",
        "model.path=no/such/model",
        "--set",
        f"local.run_dir={run_dir}",
    )
    assert res.returncode == 2
    assert "model.path: no such directory: no/such/model" in res.stderr
    assert not run_dir.exists()


def test_incomplete_model_dir_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    res = _cli("learner", "examples/tiny/config.yaml", "--set", f"model.path={tmp_path / 'm'}")
    assert res.returncode == 2
    assert "has no weights" in res.stderr and "has no tokenizer files" in res.stderr


def test_port_in_use_names_the_setting() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _cli(
            "generator", "examples/tiny/config.yaml", "--set", f"metrics.generator_port={port}"
        )
    assert res.returncode == 2
    assert f"metrics.generator_port={port}" in res.stderr
    assert "metrics.generator_port=0" in res.stderr


def test_malformed_redis_url_from_the_environment_is_refused() -> None:
    res = _cli("learner", "examples/tiny/config.yaml", env={"LPREG_REDIS_URL": "garbage"})
    assert res.returncode == 2
    assert "$LPREG_REDIS_URL" in res.stderr and "redis://" in res.stderr


def test_learner_that_fails_at_start_leaves_no_run_folder(tmp_path: Path) -> None:
    # A model directory that passes the file checks but cannot be loaded.
    model = tmp_path / "m"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text("not a model")
    run_dir = tmp_path / "run"
    res = _cli(
        "local",
        "examples/tiny/config.yaml",
        "--set",
        f"model.path={model}",
        "--set",
        f"local.run_dir={run_dir}",
        "--set",
        "local.progress=false",
    )
    assert res.returncode == 1
    assert "the learner failed to start" in res.stderr
    assert not run_dir.exists()


def test_resume_without_a_run_says_what_to_pass(tmp_path: Path) -> None:
    res = _cli("local", "examples/tiny/config.yaml", "--resume", str(tmp_path / "nothing"))
    assert res.returncode == 2
    assert "holds no checkpoints/" in res.stderr

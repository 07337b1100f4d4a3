"""Overrides that switch typed variants, did-you-mean, errors that name the file, URL checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpreg_core.config import ConfigError, RunConfig, load_config, redis_url_problem

TINY = "examples/tiny/config.yaml"


def test_type_override_switches_the_loss_variant_to_its_own_defaults() -> None:
    loss = load_config(TINY, ["learner.loss.type=grpo"]).learner.loss
    assert loss.type == "grpo"
    # The tiny config's lp_reg block has clip 1.0 / 9.0: GRPO must not inherit them.
    assert (loss.clip_low, loss.clip_high) == (0.2, 0.2)


def test_fields_set_before_the_switch_survive_it_and_after_it_apply() -> None:
    before = load_config(TINY, ["learner.loss.clip_low=0.1", "learner.loss.type=clip_higher"])
    assert before.learner.loss.type == "clip_higher"
    assert before.learner.loss.clip_low == 0.1
    after = load_config(TINY, ["learner.loss.type=grpo", "learner.loss.clip_high=0.3"])
    assert after.learner.loss.clip_high == 0.3


def test_same_type_override_keeps_the_file_fields() -> None:
    loss = load_config(TINY, ["learner.loss.type=lp_reg"]).learner.loss
    assert loss.type == "lp_reg"
    assert loss.rho_neg == 0.05  # from the file, not the default


def test_backend_variant_switch() -> None:
    backend = load_config(TINY, ["generator.backend.type=vllm"]).generator.backend
    assert backend.type == "vllm"
    back = load_config(None, ["generator.backend.type=vllm", "generator.backend.type=hf"])
    assert back.generator.backend.type == "hf"


def test_plain_type_field_is_not_a_variant_switch(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner:\n  off_policy:\n    type: none\n    cap: 3.0\n")
    off = load_config(cfg, ["learner.off_policy.type=tis"]).learner.off_policy
    assert (off.type, off.cap) == ("tis", 3.0)


def test_unknown_variant_and_unknown_fields_suggest_names() -> None:
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_config(TINY, ["learner.loss.type=grpoo"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(TINY, ["learner.stpes=3"])
    with pytest.raises(ConfigError, match="did you mean 'learner'"):
        load_config(TINY, ["learnr.steps=3"])
    with pytest.raises(ConfigError, match="not a field of the 'grpo' variant"):
        load_config(TINY, ["learner.loss.type=grpo", "learner.loss.kappa=0.1"])


def test_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("learner:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(typo)
    assert str(typo) in str(e.value) and "did you mean 'steps'" in str(e.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("learner:\n  steps: [3\n")
    with pytest.raises(ConfigError) as e:
        load_config(broken)
    assert str(broken) in str(e.value)
    assert "<unicode string>" not in str(e.value)


@pytest.mark.parametrize(
    "url",
    ["garbage", "http://host:6379/0", "redis://", "redis://host:notaport/0", "redis://h:1/x"],
)
def test_malformed_redis_urls_fail_at_load_time(url: str) -> None:
    assert redis_url_problem(url) is not None
    with pytest.raises(ConfigError, match="redis.url"):
        load_config(TINY, [f"redis.url={url}"])


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://user@host:6380/1", "redis://host", "unix:///s"]
)
def test_good_redis_urls(url: str) -> None:
    assert redis_url_problem(url) is None


@pytest.mark.parametrize("run_id", ["tiny\n", "a b", "", "x" * 65])
def test_run_id_must_match_whole_string(run_id: str) -> None:
    with pytest.raises(ValueError):
        RunConfig(run_id=run_id)

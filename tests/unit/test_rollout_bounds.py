"""Hostile but well-formed stream entries: the bounds of lpreg_core.rollout, and that whatever
passes them cannot crash the learner's batch building or make a step non-finite."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rollout import RUN, make_completion, make_group, make_task
from transformers import AutoModelForCausalLM

from lpreg_core.config import ConfigError, LearnerConfig, load_config
from lpreg_core.rollout import (
    LOGPROB_FLOOR,
    LOGPROB_POSITIVE_TOLERANCE,
    MAX_ABS_REWARD,
    MAX_COMPLETIONS,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MAX_VERSION,
    MIN_TEMPERATURE,
    InvalidEntry,
    decode_group,
    decode_task,
    encode_group,
    encode_task,
)
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.trainer import Trainer, build_batch
from services.transport.memory import InMemoryStreams

VOCAB = 100
MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"


def decode(group: rollout_pb2.RolloutGroup, **kw: object) -> rollout_pb2.RolloutGroup:
    args: dict[str, object] = dict(max_bytes=64 << 20, vocab_size=VOCAB, run_id=RUN)
    args.update(kw)
    return decode_group(encode_group(group), **args)  # type: ignore[arg-type]


def completion(n: int, **overrides: object) -> rollout_pb2.Completion:
    fields: dict[str, object] = dict(
        token_ids=[5] * n, logprobs=[-0.5] * n, versions=[1] * n, reward=1.0
    )
    fields.update(overrides)
    return make_completion(**fields)


# -- rollout groups ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "bad"),
    [
        # The issue's poison: 2**63 passed and crashed build_batch's int64 tensor.
        ("version 2**63", completion(3, versions=[1, 1, 2**63])),
        ("version 2**64-1", completion(3, versions=[2**64 - 1] * 3)),
        ("reward 3e38", completion(3, reward=3e38)),
        ("reward -inf", completion(3, reward=-math.inf)),
        ("reward nan", completion(3, reward=math.nan)),
        ("reward just past the bound", completion(3, reward=MAX_ABS_REWARD * 1.01)),
        ("logprob -1e30", completion(3, logprobs=[-0.1, -1e30, -0.1])),
        ("logprob below the floor", completion(3, logprobs=[LOGPROB_FLOOR * 1.01] * 3)),
    ],
)
def test_forged_completion_values_are_rejected(what: str, bad: rollout_pb2.Completion) -> None:
    group = make_group(completions=[completion(3), bad])
    with pytest.raises(InvalidEntry) as info:
        decode(group)
    assert info.value.reason == "validate", what


def test_too_many_completions_are_rejected_before_anything_is_read() -> None:
    group = make_group(completions=[completion(1)] * (MAX_COMPLETIONS + 1))
    with pytest.raises(InvalidEntry) as info:
        decode(group)
    assert info.value.reason == "too_large"
    assert "completions" in info.value.detail
    # The issue's forged group had 2,000.
    with pytest.raises(InvalidEntry):
        decode(make_group(completions=[completion(1)] * 2000))


def test_completion_length_is_bounded_by_the_learners_limit() -> None:
    # The issue's 48 KB group: 2 x 4,000 tokens against a learner sampling 8.
    group = make_group(completions=[completion(4000), completion(4000)])
    assert len(encode_group(group)) < 64 << 10
    with pytest.raises(InvalidEntry) as info:
        decode(group, max_completion_tokens=8)
    assert info.value.reason == "too_large"
    assert "limit 8" in info.value.detail
    # Without a per-completion limit only the total bounds it.
    assert len(decode(group).completions) == 2
    # Exactly at the limit is fine.
    assert (
        len(
            decode(make_group(completions=[completion(8)] * 2), max_completion_tokens=8).completions
        )
        == 2
    )


def test_int64_data_index_and_issue_version() -> None:
    for field in ("data_index", "issue_version"):
        with pytest.raises(InvalidEntry):
            decode(make_group(**{field: 2**63}))
    assert decode(make_group(data_index=2**63 - 1, issue_version=2**63 - 1)).data_index == 2**63 - 1


def test_extreme_but_valid_values_pass() -> None:
    group = make_group(
        completions=[
            completion(3, versions=[MAX_VERSION] * 3, reward=MAX_ABS_REWARD),
            completion(3, logprobs=[LOGPROB_FLOOR] * 3, reward=-MAX_ABS_REWARD),
        ]
    )
    got = decode(group)
    assert got.completions[0].versions[0] == MAX_VERSION
    assert got.completions[1].reward == -MAX_ABS_REWARD


@pytest.mark.parametrize(
    ("logprobs", "detail"),
    [
        ([-0.5, math.nan, -0.5], "non-finite logprob"),
        ([-0.5, math.inf, -0.5], "non-finite logprob"),
        ([-0.5, -math.inf, -0.5], "non-finite logprob"),
        # A NaN is reported as such even beside a value out of bounds.
        ([0.5, math.nan, -100.0], "non-finite logprob"),
        ([-0.5, 0.5, -0.5], "logprob 0.5 > 0 (not a log-probability)"),
        ([-0.5, 0.5, -100.0], "logprob 0.5 > 0"),
        ([-0.5, -100.0, -0.5], f"logprob -100.0 < {LOGPROB_FLOOR} (not a sampled token)"),
        # float32 rounds 1e-3 up: that value is above the tolerance in float64, as sent.
        ([-0.5, float(np.float32(LOGPROB_POSITIVE_TOLERANCE)), -0.5], "> 0"),
    ],
)
def test_a_bad_logprob_is_reported_for_its_completion(logprobs: list[float], detail: str) -> None:
    group = make_group(completions=[completion(3), completion(3, logprobs=logprobs)])
    with pytest.raises(InvalidEntry) as info:
        decode(group)
    assert info.value.reason == "validate"
    assert "completion 1 has" in info.value.detail and detail in info.value.detail


# -- prompt tasks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"temperature": 1e-7},  # the issue's poison: rounded to 0, every generator exited 1
        {"temperature": MIN_TEMPERATURE / 2},
        {"temperature": MAX_TEMPERATURE * 2},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"num_samples": MAX_COMPLETIONS + 1},
        {"num_samples": 2**32 - 1},
        {"max_new_tokens": MAX_NEW_TOKENS + 1},
        {"data_index": 2**63},
        {"issue_version": 2**64 - 1},
    ],
)
def test_poison_tasks_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidEntry) as info:
        decode_task(encode_task(make_task(**overrides)), max_bytes=1 << 20, run_id=RUN)
    assert info.value.reason == "validate"


def test_task_bounds_are_inclusive() -> None:
    for overrides in (
        {"temperature": MIN_TEMPERATURE, "num_samples": 1, "max_new_tokens": 1},
        {
            "temperature": MAX_TEMPERATURE,
            "num_samples": MAX_COMPLETIONS,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
    ):
        task = decode_task(encode_task(make_task(**overrides)), max_bytes=1 << 20, run_id=RUN)
        assert task.num_samples == overrides["num_samples"]


def test_config_cannot_issue_tasks_its_generators_refuse() -> None:
    """Every config the loader accepts issues tasks that pass decode_task: the sampling bounds
    are inside the wire bounds (temperature rounds to float32 on the wire)."""
    for temperature in (1e-3, 10.0):
        config = load_config(
            None, [f"sampling.temperature={temperature}", f"learner.loss.temperature={temperature}"]
        )
        task = make_task(
            temperature=config.sampling.temperature,
            num_samples=1024,
            max_new_tokens=config.sampling.max_new_tokens,
        )
        decode_task(encode_task(task), max_bytes=1 << 20, run_id=RUN)
    for bad in ("sampling.temperature=1e-7", f"sampling.max_new_tokens={MAX_NEW_TOKENS + 1}"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_learner_completion_limit_defaults_to_max_new_tokens_and_cannot_undercut_it() -> None:
    assert load_config(None, ["sampling.max_new_tokens=32"]).max_completion_tokens == 32
    config = load_config(None, ["sampling.max_new_tokens=32", "learner.max_completion_tokens=64"])
    assert config.max_completion_tokens == 64
    with pytest.raises(ConfigError, match="max_completion_tokens"):
        load_config(None, ["sampling.max_new_tokens=32", "learner.max_completion_tokens=16"])


# -- the transports dead-letter and ack both streams --------------------------------------------


def test_in_memory_transport_dead_letters_and_acks_poison_on_both_streams() -> None:
    streams = InMemoryStreams(RUN, "learner", max_completion_tokens=8)
    streams.add_raw_entry("prompts", encode_task(make_task(temperature=1e-7)))
    streams.add_raw_entry("rollouts", encode_group(make_group(completions=[completion(9)] * 2)))
    streams.add_raw_entry(
        "rollouts", encode_group(make_group(completions=[completion(3, versions=[2**63] * 3)] * 2))
    )
    assert streams.read_tasks(10, 0) == []
    assert streams.read_groups(10, 0, vocab_size=VOCAB) == []
    assert streams.dlq_length() == 3
    # Acked, so a restarted consumer (replay of its pending entries) never sees them again.
    again = streams.for_consumer("learner")
    assert again.read_tasks(10, 0) == []
    assert again.read_groups(10, 0, vocab_size=VOCAB) == []
    assert streams.pending_counts() == {"prompts": 0, "rollouts": 0}


# -- batch building on the worst valid values ---------------------------------------------------


def worst_valid_groups(max_completion_tokens: int) -> list[rollout_pb2.RolloutGroup]:
    """Groups at every bound at once, each of which passes decode_group."""
    n = max_completion_tokens
    groups = [
        # Longest completions, newest possible versions, extreme rewards and log-probs.
        make_group(
            task_id="long",
            prompt_token_ids=[VOCAB - 1] * 3,
            completions=[
                completion(
                    n,
                    token_ids=[VOCAB - 1] * n,
                    versions=[MAX_VERSION] * n,
                    logprobs=[LOGPROB_FLOOR] * n,
                    reward=MAX_ABS_REWARD,
                ),
                completion(
                    n,
                    versions=[0] * (n - 1) + [MAX_VERSION],
                    logprobs=[0.0] * n,
                    reward=-MAX_ABS_REWARD,
                ),
            ],
        ),
        # The largest group of one-token completions, all the same extreme reward.
        make_group(
            task_id="wide",
            completions=[completion(1, reward=-MAX_ABS_REWARD)] * MAX_COMPLETIONS,
        ),
        # Rewards at the bound that float32 can only approximate, one of them alone at the top.
        make_group(
            task_id="mixed",
            completions=[completion(2, reward=MAX_ABS_REWARD)]
            + [completion(2, reward=-MAX_ABS_REWARD)] * 7,
        ),
    ]
    return [decode(g, max_completion_tokens=max_completion_tokens) for g in groups]


@pytest.mark.parametrize("mode", ["std", "no_std", "leave_one_out"])
def test_build_batch_takes_the_worst_valid_groups(mode: str) -> None:
    limit = 4096
    groups = worst_valid_groups(limit)
    batch = build_batch(groups, mode)
    num = 2 + MAX_COMPLETIONS + 8
    assert batch.tokens.shape == (num, limit)
    assert batch.versions.dtype == torch.long
    assert int(batch.versions.max()) == MAX_VERSION
    assert int(batch.versions[1, limit - 1]) == MAX_VERSION and int(batch.versions[1, 0]) == 0
    for name in ("mask", "advantages", "behaviour_log_probs", "rewards"):
        tensor = getattr(batch, name)
        assert torch.isfinite(tensor).all(), name
    assert float(batch.behaviour_log_probs.min()) == LOGPROB_FLOOR
    assert float(batch.rewards.abs().max()) == MAX_ABS_REWARD
    assert batch.num_tokens == 2 * limit + MAX_COMPLETIONS + 16
    # Padding stays zero whatever the neighbours hold.
    padding = batch.mask == 0
    assert not batch.advantages[padding].any() and not batch.tokens[padding].any()
    assert np.isfinite(batch.advantages.numpy()).all()


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


@pytest.mark.parametrize("off_policy", ["none", "tis", "decoupled"])
def test_a_step_on_extreme_valid_values_stays_finite(
    tiny_model: torch.nn.Module, off_policy: str
) -> None:
    """Log-probs at the floor make pi_prox / pi_behav overflow float32; the corrections must cap
    or mask it, so weights and the loss stay finite."""
    vocab = int(tiny_model.config.vocab_size)
    n = 6
    group = make_group(
        prompt_token_ids=[3, 4, 5],
        vocab_size=vocab,
        completions=[
            completion(n, token_ids=[vocab - 1] * n, logprobs=[LOGPROB_FLOOR] * n,
                       versions=[MAX_VERSION] * n, reward=MAX_ABS_REWARD),
            completion(n, token_ids=[7] * n, logprobs=[0.0] * n, reward=-MAX_ABS_REWARD),
            completion(n, token_ids=[8] * n, logprobs=[-1.0] * n, reward=0.0),
        ],
    )  # fmt: skip
    group = decode(group, vocab_size=vocab, max_completion_tokens=n)
    model = copy.deepcopy(tiny_model)
    before = [p.detach().clone() for p in model.parameters()]
    config = LearnerConfig.model_validate(
        {
            "optimizer": {"lr": 1e-3},
            "max_staleness": 0 if off_policy == "none" else 1,
            "off_policy": {"type": off_policy},
        }
    )
    stats = Trainer(model, config).step(build_batch([group], "no_std"))
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

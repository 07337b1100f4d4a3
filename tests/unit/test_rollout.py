"""The rollout wire schema (lpreg_core.rollout). The transports are tested in tests/contract."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import pytest

from lpreg_core import rollout
from lpreg_core.rollout import (
    SCHEMA_VERSION,
    InvalidEntry,
    decode_group,
    decode_task,
    encode_group,
    encode_task,
    group_policy_versions,
)
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.common import metrics

VOCAB = 100
RUN = "run-a"
MAX_BYTES = 1 << 20


def make_task(task_id: str = "t-1", **overrides: object) -> rollout_pb2.PromptTask:
    fields: dict[str, object] = dict(
        run_id=RUN,
        task_id=task_id,
        prompt_id="p-1",
        prompt="1+1=",
        answer="2",
        data_index=3,
        epoch=0,
        num_samples=2,
        issue_version=4,
        issued_at=1000.0,
        temperature=1.0,
        max_new_tokens=8,
    )
    fields.update(overrides)
    return rollout_pb2.PromptTask(**fields)  # type: ignore[arg-type]


def make_completion(**overrides: object) -> rollout_pb2.Completion:
    fields: dict[str, object] = dict(
        token_ids=[5, 6, 7],
        logprobs=[-0.5, -1.0, 0.0],
        versions=[4, 4, 5],
        reward=1.0,
        finish_reason=rollout_pb2.FINISH_REASON_STOP,
        text="2",
    )
    fields.update(overrides)
    return rollout_pb2.Completion(**fields)  # type: ignore[arg-type]


def make_group(task_id: str = "t-1", **overrides: object) -> rollout_pb2.RolloutGroup:
    fields: dict[str, object] = dict(
        run_id=RUN,
        rollout_id=f"r-{task_id}",
        task_id=task_id,
        prompt_id="p-1",
        generator_id="gen-0",
        data_index=3,
        issue_version=4,
        prompt_token_ids=[1, 2, 3],
        completions=[make_completion(), make_completion(versions=[3, 3, 3], reward=0.0)],
        timings=rollout_pb2.Timings(queue_s=0.1, generate_s=0.2, score_s=0.01),
        created_at=1001.0,
        vocab_size=VOCAB,
    )
    fields.update(overrides)
    return rollout_pb2.RolloutGroup(**fields)  # type: ignore[arg-type]


def decode(data: bytes, **kw: object) -> rollout_pb2.RolloutGroup:
    args: dict[str, object] = dict(max_bytes=MAX_BYTES, vocab_size=VOCAB, run_id=RUN)
    args.update(kw)
    return decode_group(data, **args)  # type: ignore[arg-type]


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(InvalidEntry) as info:
        fn()
    assert info.value.reason in rollout.DLQ_REASONS
    assert info.value.detail
    return info.value.reason


# -- schema ---------------------------------------------------------------------------------------


def test_dlq_reasons_match_the_metrics_labels() -> None:
    assert rollout.DLQ_REASONS == metrics.DLQ_REASONS


def test_task_round_trip_stamps_schema_version() -> None:
    task = make_task()
    data = encode_task(task)
    assert task.schema_version == SCHEMA_VERSION
    assert decode_task(data, max_bytes=MAX_BYTES, run_id=RUN) == task


def test_group_round_trip_stamps_schema_version() -> None:
    group = make_group()
    out = decode(encode_group(group))
    assert out == group
    assert out.schema_version == SCHEMA_VERSION


def test_encode_refuses_a_foreign_schema_version() -> None:
    with pytest.raises(ValueError, match="schema_version 2"):
        encode_group(make_group(schema_version=2))


def test_invalid_entry_rejects_unknown_reasons_and_pickles() -> None:
    with pytest.raises(ValueError, match="unknown dead-letter reason"):
        InvalidEntry("nope", "x")
    e = pickle.loads(pickle.dumps(InvalidEntry("validate", "bad logprob")))
    assert (e.reason, e.detail) == ("validate", "bad logprob")


def test_group_policy_versions_spans_all_completions() -> None:
    assert group_policy_versions(make_group()) == (3, 5)
    with pytest.raises(ValueError, match="no sampled tokens"):
        group_policy_versions(rollout_pb2.RolloutGroup(rollout_id="x"))


def test_vocab_and_run_checks_are_optional() -> None:
    group = make_group(run_id="other", vocab_size=0, prompt_token_ids=[10**6])
    assert decode(encode_group(group), vocab_size=None, run_id=None) == group


# -- rejections, one per rule -----------------------------------------------------------------------


def test_too_large_payload() -> None:
    data = encode_group(make_group())
    assert reason_of(lambda: decode(data, max_bytes=len(data) - 1)) == "too_large"
    assert decode(data, max_bytes=len(data)).rollout_id == "r-t-1"


def test_too_many_tokens() -> None:
    data = encode_group(make_group())
    # 3 prompt tokens + 2 completions x 3 tokens
    assert reason_of(lambda: decode(data, max_tokens=8)) == "too_large"
    assert decode(data, max_tokens=9).rollout_id == "r-t-1"


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\x05ab", b"\x12\x02\xc3\x28", bytes(range(256))],
    ids=["bad-tag", "truncated-length", "invalid-utf8", "garbage"],
)
def test_undecodable_bytes(data: bytes) -> None:
    assert reason_of(lambda: decode(data)) == "decode"
    assert reason_of(lambda: decode_task(data, max_bytes=MAX_BYTES)) == "decode"


def test_non_bytes_payload_is_a_decode_error() -> None:
    assert reason_of(lambda: decode("text")) == "decode"  # type: ignore[arg-type]
    assert reason_of(lambda: decode_task(None, max_bytes=10)) == "decode"  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_schema_version(version: int) -> None:
    group = make_group()
    group.schema_version = version
    assert reason_of(lambda: decode(group.SerializeToString())) == "schema_version"
    task = make_task(schema_version=version)
    assert (
        reason_of(lambda: decode_task(task.SerializeToString(), max_bytes=MAX_BYTES))
        == "schema_version"
    )


GROUP_MUTATIONS: dict[str, Callable[[rollout_pb2.RolloutGroup], None]] = {
    "empty run_id": lambda g: setattr(g, "run_id", ""),
    "empty rollout_id": lambda g: setattr(g, "rollout_id", ""),
    "empty task_id": lambda g: setattr(g, "task_id", ""),
    "empty prompt_id": lambda g: setattr(g, "prompt_id", ""),
    "empty generator_id": lambda g: setattr(g, "generator_id", ""),
    "other run": lambda g: setattr(g, "run_id", "run-b"),
    "other vocab": lambda g: setattr(g, "vocab_size", VOCAB + 1),
    "no completions": lambda g: g.ClearField("completions"),
    "no prompt tokens": lambda g: g.ClearField("prompt_token_ids"),
    "prompt token out of vocab": lambda g: g.prompt_token_ids.append(VOCAB),
    "completion token out of vocab": lambda g: g.completions[1].token_ids.__setitem__(0, VOCAB),
    "empty completion": lambda g: g.completions.add(),
    "missing logprob": lambda g: g.completions[0].logprobs.pop(),
    "missing version": lambda g: g.completions[0].versions.pop(),
    "extra token": lambda g: g.completions[0].token_ids.append(1),
    "nan logprob": lambda g: g.completions[0].logprobs.__setitem__(1, math.nan),
    "-inf logprob": lambda g: g.completions[0].logprobs.__setitem__(1, -math.inf),
    "positive logprob": lambda g: g.completions[0].logprobs.__setitem__(1, 0.5),
    "decreasing versions": lambda g: g.completions[0].versions.__setitem__(2, 3),
    "nan reward": lambda g: setattr(g.completions[0], "reward", math.nan),
    "inf reward": lambda g: setattr(g.completions[1], "reward", math.inf),
    "unknown finish reason": lambda g: setattr(g.completions[0], "finish_reason", 7),
    "nan timing": lambda g: setattr(g.timings, "generate_s", math.nan),
    "inf created_at": lambda g: setattr(g, "created_at", math.inf),
}


@pytest.mark.parametrize("mutation", sorted(GROUP_MUTATIONS))
def test_invalid_group_is_rejected(mutation: str) -> None:
    group = make_group()
    GROUP_MUTATIONS[mutation](group)
    group.schema_version = SCHEMA_VERSION
    assert reason_of(lambda: decode(group.SerializeToString())) == "validate"


def test_tiny_positive_logprob_from_rounding_is_accepted() -> None:
    group = make_group()
    group.completions[0].logprobs[2] = 1e-6
    assert decode(encode_group(group)).completions[0].logprobs[2] == pytest.approx(1e-6)


def test_versions_may_predate_the_issue_version() -> None:
    group = make_group(issue_version=10)
    assert group_policy_versions(decode(encode_group(group))) == (3, 5)


TASK_MUTATIONS: dict[str, Callable[[rollout_pb2.PromptTask], None]] = {
    "empty run_id": lambda t: setattr(t, "run_id", ""),
    "empty task_id": lambda t: setattr(t, "task_id", ""),
    "empty prompt_id": lambda t: setattr(t, "prompt_id", ""),
    "other run": lambda t: setattr(t, "run_id", "run-b"),
    "zero samples": lambda t: setattr(t, "num_samples", 0),
    "zero max_new_tokens": lambda t: setattr(t, "max_new_tokens", 0),
    "zero temperature": lambda t: setattr(t, "temperature", 0.0),
    "nan temperature": lambda t: setattr(t, "temperature", math.nan),
    "inf issued_at": lambda t: setattr(t, "issued_at", math.inf),
}


@pytest.mark.parametrize("mutation", sorted(TASK_MUTATIONS))
def test_invalid_task_is_rejected(mutation: str) -> None:
    task = make_task()
    TASK_MUTATIONS[mutation](task)
    data = encode_task(task)
    assert reason_of(lambda: decode_task(data, max_bytes=MAX_BYTES, run_id=RUN)) == "validate"


def test_task_too_large() -> None:
    data = encode_task(make_task(prompt="x" * 2000))
    assert reason_of(lambda: decode_task(data, max_bytes=1024)) == "too_large"

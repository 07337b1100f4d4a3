"""The rollout wire schema: encoding, decoding and validation of stream entries.

Prompt tasks and rollout groups cross process (and machine) boundaries as protobuf bytes
(protos/lpreg/v1/rollout.proto). Whatever arrives is untrusted: a generator may run a different
build, a bit may flip, someone may XADD by hand. ``decode_task`` and ``decode_group`` therefore
accept any bytes and either return a message that satisfies every invariant the learner relies on,
or raise :class:`InvalidEntry` with a reason from :data:`DLQ_REASONS` that the transport records in
the dead-letter stream. They never raise anything else.

Example::

    data = encode_group(group)
    try:
        group = decode_group(data, max_bytes=16 << 20, vocab_size=32000, run_id="tiny")
    except InvalidEntry as e:
        dead_letter(data, reason=e.reason, detail=e.detail)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import numpy as np
from google.protobuf.message import DecodeError

from lpreg_core.wire.lpreg.v1 import rollout_pb2

SCHEMA_VERSION: Final = 1

# Why an entry was dead-lettered; services/common/metrics.DLQ_REASONS labels the counter with these.
# "unexpected": well formed but not what was asked for (a task never issued or already done, a
# version from the future, the wrong group size or length).
DLQ_REASONS: Final = ("decode", "schema_version", "validate", "too_large", "unexpected")

# log_softmax rounding can give the most likely token a log-probability a hair above 0; anything
# larger means the producer sent probabilities, logits or garbage instead of log-probabilities.
LOGPROB_POSITIVE_TOLERANCE: Final = 1e-3

DEFAULT_MAX_TOKENS: Final = 1_000_000

# Bounds on what a stream entry may ask for or claim. Each one keeps a forged or corrupt entry
# from crashing, stalling or skewing whoever trains or samples on it; legitimate values sit far
# inside them.
# Policy versions become int64 tensors (and Redis integers): 2**63 and above overflow.
MAX_VERSION: Final = 2**63 - 1
# data_index is turned back into a prompt position (int64 as well).
MAX_DATA_INDEX: Final = 2**63 - 1
# Verifier rewards are O(1); a bound keeps group means, advantages and the reward metrics finite
# (float32 rewards near 3e38 overflow to inf as soon as two are added).
MAX_ABS_REWARD: Final = 1e6
# Completions per group (sampling.num_samples has the same bound): cost and memory per entry.
MAX_COMPLETIONS: Final = 1024
# Smallest log-probability of a sampled token. Generators sample from float32 probabilities;
# one below e^-80 (1.8e-35, near float32's smallest normal number e^-87.3) is drawn with odds
# under 1e-29 per token, so a lower value is not a sampled token. It also keeps the learner's
# importance weight pi_prox / pi_behav = exp(proximal - behaviour) <= e^80, finite in float32.
LOGPROB_FLOOR: Final = -80.0
# Sampling temperatures a generator accepts: below 1e-3 the logits / T division overflows or
# rounds to a zero temperature; above 100 the distribution is uniform noise.
MIN_TEMPERATURE: Final = 1e-3
MAX_TEMPERATURE: Final = 100.0
# max_new_tokens a task may ask for (sampling.max_new_tokens has the same bound).
MAX_NEW_TOKENS: Final = 1_000_000

_FINISH_REASONS: Final = frozenset(rollout_pb2.FinishReason.values())


class InvalidEntry(Exception):
    """A stream entry that must not be used; ``reason`` is one of :data:`DLQ_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DLQ_REASONS:
            raise ValueError(
                f"unknown dead-letter reason {reason!r}; expected one of {DLQ_REASONS}"
            )
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidEntry], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


def _stamp_schema_version(message: rollout_pb2.PromptTask | rollout_pb2.RolloutGroup) -> None:
    if message.schema_version == 0:
        message.schema_version = SCHEMA_VERSION
    elif message.schema_version != SCHEMA_VERSION:
        raise ValueError(
            f"cannot encode a {type(message).__name__} with schema_version "
            f"{message.schema_version}; this build writes version {SCHEMA_VERSION}"
        )


def encode_task(task: rollout_pb2.PromptTask) -> bytes:
    """Serialise a prompt task; an unset ``schema_version`` is stamped with SCHEMA_VERSION in place."""
    _stamp_schema_version(task)
    return task.SerializeToString()


def encode_group(group: rollout_pb2.RolloutGroup) -> bytes:
    """Serialise a rollout group; an unset ``schema_version`` is stamped with SCHEMA_VERSION in place."""
    _stamp_schema_version(group)
    return group.SerializeToString()


def _as_bytes(data: object, max_bytes: int) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidEntry("decode", f"payload is {type(data).__name__}, not bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise InvalidEntry("too_large", f"payload of {size} bytes exceeds the limit of {max_bytes}")
    return bytes(data)


def _parse(message: rollout_pb2.PromptTask | rollout_pb2.RolloutGroup, data: bytes) -> None:
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise InvalidEntry(
            "decode", f"not a valid {type(message).__name__} ({len(data)} bytes): {e}"
        ) from None


def _check_schema_version(version: int, what: str) -> None:
    if version != SCHEMA_VERSION:
        raise InvalidEntry(
            "schema_version",
            f"{what} has schema_version {version}; this build reads version {SCHEMA_VERSION}",
        )


def _require_ids(message: object, names: tuple[str, ...], what: str) -> None:
    for name in names:
        if not getattr(message, name):
            raise InvalidEntry("validate", f"{what} has an empty {name}")


def _check_run_id(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise InvalidEntry("validate", f"{what} belongs to run {actual!r}, not {expected!r}")


def validate_task(task: rollout_pb2.PromptTask, *, run_id: str | None = None) -> None:
    """Raise InvalidEntry unless ``task`` is a prompt task a generator can act on: schema
    version, ids, run id (when given), 1..MAX_COMPLETIONS samples, 1..MAX_NEW_TOKENS new tokens,
    a temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE], int64 data_index and issue_version, a
    finite issued_at."""
    _check_schema_version(task.schema_version, "prompt task")
    _require_ids(task, ("run_id", "task_id", "prompt_id"), "prompt task")
    what = f"prompt task {task.task_id!r}"
    _check_run_id(task.run_id, run_id, what)
    if not 1 <= task.num_samples <= MAX_COMPLETIONS:
        raise InvalidEntry(
            "validate", f"{what} asks for {task.num_samples} samples, not 1..{MAX_COMPLETIONS}"
        )
    if not 1 <= task.max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidEntry(
            "validate",
            f"{what} has max_new_tokens {task.max_new_tokens}, not 1..{MAX_NEW_TOKENS}",
        )
    # NaN fails both comparisons.
    if not MIN_TEMPERATURE <= task.temperature <= MAX_TEMPERATURE:
        raise InvalidEntry(
            "validate",
            f"{what} has temperature {task.temperature}, not {MIN_TEMPERATURE}..{MAX_TEMPERATURE}",
        )
    if task.data_index > MAX_DATA_INDEX or task.issue_version > MAX_VERSION:
        raise InvalidEntry(
            "validate",
            f"{what} has data_index {task.data_index} / issue_version {task.issue_version} "
            "beyond int64",
        )
    if not math.isfinite(task.issued_at):
        raise InvalidEntry("validate", f"{what} has issued_at {task.issued_at}")


def decode_task(
    data: bytes, *, max_bytes: int, run_id: str | None = None
) -> rollout_pb2.PromptTask:
    """Decode and validate a prompt task; raises only InvalidEntry, whatever ``data`` holds.

    ``run_id``, when given, must match the task's run id.
    """
    raw = _as_bytes(data, max_bytes)
    task = rollout_pb2.PromptTask()
    _parse(task, raw)
    validate_task(task, run_id=run_id)
    return task


def _values(field: Iterable[float], dtype: type[np.generic]) -> np.ndarray:
    """A repeated scalar field's values as an array, in one call.

    protobuf's upb containers hand their contents to numpy through ``__array__`` (a copy, no
    per-element Python objects); with another implementation numpy reads the sequence. The
    field's own type (uint32, float, uint64) is ``dtype``, so the values are exact.
    """
    return np.asarray(field, dtype=dtype)


def _check_token_ids(ids: np.ndarray, vocab_size: int | None, what: str) -> None:
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        raise InvalidEntry(
            "validate", f"{what} has token id {int(ids.max())} >= vocab_size {vocab_size}"
        )


def _validate_completion(
    c: rollout_pb2.Completion, vocab_size: int | None, max_completion_tokens: int, what: str
) -> None:
    num_tokens = len(c.token_ids)
    if num_tokens == 0:
        raise InvalidEntry("validate", f"{what} has no tokens")
    if num_tokens > max_completion_tokens:
        raise InvalidEntry(
            "too_large", f"{what} has {num_tokens} tokens, limit {max_completion_tokens}"
        )
    if len(c.logprobs) != num_tokens or len(c.versions) != num_tokens:
        raise InvalidEntry(
            "validate",
            f"{what} has {num_tokens} tokens but {len(c.logprobs)} logprobs and "
            f"{len(c.versions)} versions",
        )
    _check_token_ids(_values(c.token_ids, np.uint32), vocab_size, what)
    logprobs = _values(c.logprobs, np.float32)
    # One pass each for the extremes: a NaN makes both NaN (failing both bounds), an infinity
    # fails one; the reason is then looked for in the order below.
    lowest, highest = float(logprobs.min()), float(logprobs.max())
    if not (lowest >= LOGPROB_FLOOR and highest <= LOGPROB_POSITIVE_TOLERANCE):
        if not np.isfinite(logprobs).all():
            raise InvalidEntry("validate", f"{what} has a non-finite logprob")
        if highest > LOGPROB_POSITIVE_TOLERANCE:
            raise InvalidEntry(
                "validate", f"{what} has logprob {highest} > 0 (not a log-probability)"
            )
        raise InvalidEntry(
            "validate",
            f"{what} has logprob {lowest} < {LOGPROB_FLOOR} (not a sampled token)",
        )
    versions = _values(c.versions, np.uint64)
    if int(versions.max()) > MAX_VERSION:
        raise InvalidEntry(
            "validate", f"{what} has policy version {int(versions.max())} > {MAX_VERSION}"
        )
    if num_tokens > 1 and not (versions[1:] >= versions[:-1]).all():
        raise InvalidEntry(
            "validate", f"{what} has policy versions that decrease along the sequence"
        )
    # NaN fails the comparison.
    if not abs(c.reward) <= MAX_ABS_REWARD:
        raise InvalidEntry("validate", f"{what} has reward {c.reward}, |r| > {MAX_ABS_REWARD}")
    if c.finish_reason not in _FINISH_REASONS:
        raise InvalidEntry("validate", f"{what} has unknown finish_reason {c.finish_reason}")


def validate_group(
    group: rollout_pb2.RolloutGroup,
    *,
    vocab_size: int | None,
    run_id: str | None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_completion_tokens: int | None = None,
) -> None:
    """Raise InvalidEntry unless ``group`` is safe to train on.

    Checks: schema version; non-empty run/rollout/task/prompt/generator ids; ``run_id`` match (when
    given); the group's vocab_size equals ``vocab_size`` and every prompt and completion token id is
    below it (when given); at least one prompt token and 1..MAX_COMPLETIONS completions; per
    completion at least one token and as many logprobs and versions as tokens, logprobs in
    [LOGPROB_FLOOR, 0] (up to LOGPROB_POSITIVE_TOLERANCE), versions <= MAX_VERSION and
    non-decreasing along the sequence (weights may change mid-sequence, never backwards), a reward
    with |r| <= MAX_ABS_REWARD and a known finish reason; data_index and issue_version <= int64;
    finite timings; at most ``max_tokens`` tokens in all (prompt + completions) and at most
    ``max_completion_tokens`` per completion (when given), else reason ``too_large``.

    These bounds are what the learner's batch building relies on (int64 versions, finite
    float32 rewards and log-probs, padded width <= max_completion_tokens): a group that passes
    cannot crash it.

    Versions are not compared with issue_version: a generator may legitimately sample with weights
    older than the version current at issue time.
    """
    _check_schema_version(group.schema_version, "rollout group")
    _require_ids(
        group, ("run_id", "rollout_id", "task_id", "prompt_id", "generator_id"), "rollout group"
    )
    what = f"rollout group {group.rollout_id!r}"
    _check_run_id(group.run_id, run_id, what)
    if vocab_size is not None and group.vocab_size != vocab_size:
        raise InvalidEntry(
            "validate",
            f"{what} was sampled with vocab_size {group.vocab_size}, the learner has {vocab_size}",
        )
    num_prompt = len(group.prompt_token_ids)
    if num_prompt == 0:
        raise InvalidEntry("validate", f"{what} has no prompt tokens")
    if not group.completions:
        raise InvalidEntry("validate", f"{what} has no completions")
    if len(group.completions) > MAX_COMPLETIONS:
        raise InvalidEntry(
            "too_large", f"{what} has {len(group.completions)} completions, limit {MAX_COMPLETIONS}"
        )
    if group.data_index > MAX_DATA_INDEX or group.issue_version > MAX_VERSION:
        raise InvalidEntry(
            "validate",
            f"{what} has data_index {group.data_index} / issue_version {group.issue_version} "
            "beyond int64",
        )
    num_tokens = num_prompt + sum(len(c.token_ids) for c in group.completions)
    if num_tokens > max_tokens:
        raise InvalidEntry("too_large", f"{what} has {num_tokens} tokens, limit {max_tokens}")
    _check_token_ids(_values(group.prompt_token_ids, np.uint32), vocab_size, f"{what} prompt")
    per_completion = max_tokens if max_completion_tokens is None else max_completion_tokens
    for i, completion in enumerate(group.completions):
        _validate_completion(completion, vocab_size, per_completion, f"{what} completion {i}")
    t = group.timings
    for name, value in (
        ("timings.queue_s", t.queue_s),
        ("timings.generate_s", t.generate_s),
        ("timings.score_s", t.score_s),
        ("created_at", group.created_at),
    ):
        if not math.isfinite(value):
            raise InvalidEntry("validate", f"{what} has {name} {value}")


def decode_group(
    data: bytes,
    *,
    max_bytes: int,
    vocab_size: int | None,
    run_id: str | None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_completion_tokens: int | None = None,
) -> rollout_pb2.RolloutGroup:
    """Decode and validate a rollout group (see validate_group); raises only InvalidEntry."""
    raw = _as_bytes(data, max_bytes)
    group = rollout_pb2.RolloutGroup()
    _parse(group, raw)
    validate_group(
        group,
        vocab_size=vocab_size,
        run_id=run_id,
        max_tokens=max_tokens,
        max_completion_tokens=max_completion_tokens,
    )
    return group


def group_policy_versions(group: rollout_pb2.RolloutGroup) -> tuple[int, int]:
    """(oldest, newest) policy version over every sampled token of the group.

    The oldest one decides staleness: a group is as stale as its oldest token.
    """
    lo: int | None = None
    hi: int | None = None
    for c in group.completions:
        if not c.versions:
            continue
        versions = _values(c.versions, np.uint64)
        c_lo, c_hi = int(versions.min()), int(versions.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    if lo is None or hi is None:
        raise ValueError(f"rollout group {group.rollout_id!r} has no sampled tokens")
    return lo, hi

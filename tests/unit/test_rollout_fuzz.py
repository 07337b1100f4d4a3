"""Fuzzing the decoders: whatever bytes arrive, decode_task and decode_group either return a message
that satisfies every invariant or raise InvalidEntry with a known reason; nothing else escapes."""

from __future__ import annotations

import math
import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpreg_core.rollout import (
    DLQ_REASONS,
    LOGPROB_FLOOR,
    LOGPROB_POSITIVE_TOLERANCE,
    MAX_ABS_REWARD,
    MAX_COMPLETIONS,
    MAX_DATA_INDEX,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MAX_VERSION,
    MIN_TEMPERATURE,
    SCHEMA_VERSION,
    InvalidEntry,
    decode_group,
    decode_task,
    encode_group,
    encode_task,
)
from lpreg_core.wire.lpreg.v1 import rollout_pb2

MIN_PAYLOADS = 10_000
RUN = "fuzz"

# -- valid messages to start from (plain random: cheap, so hypothesis spends its time on bytes) ----


def _valid_group(rng: random.Random) -> rollout_pb2.RolloutGroup:
    completions = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 6)
        completions.append(
            rollout_pb2.Completion(
                token_ids=[rng.randrange(300) for _ in range(n)],
                logprobs=[-rng.expovariate(1.0) for _ in range(n)],
                versions=sorted(rng.randrange(10) for _ in range(n)),
                reward=rng.choice([0.0, 1.0, rng.uniform(-1, 1)]),
                finish_reason=rng.choice([1, 2]),
                text=rng.choice(["", "42", "\u00e9"]),
            )
        )
    return rollout_pb2.RolloutGroup(
        schema_version=SCHEMA_VERSION,
        run_id=RUN,
        rollout_id=f"r{rng.randrange(10**6)}",
        task_id=f"t{rng.randrange(10**6)}",
        prompt_id="p",
        generator_id="g",
        data_index=rng.randrange(2**64),
        issue_version=rng.randrange(10),
        prompt_token_ids=[rng.randrange(300) for _ in range(rng.randint(1, 6))],
        completions=completions,
        timings=rollout_pb2.Timings(queue_s=rng.random(), generate_s=rng.random(), score_s=0.0),
        created_at=1.7e9 + rng.random(),
        vocab_size=1000,
    )


def _valid_task(rng: random.Random) -> rollout_pb2.PromptTask:
    return rollout_pb2.PromptTask(
        schema_version=SCHEMA_VERSION,
        run_id=RUN,
        task_id=f"t{rng.randrange(10**6)}",
        prompt_id="p",
        prompt="".join(rng.choice("0123456789+-*= ") for _ in range(rng.randint(0, 30))),
        answer=str(rng.randrange(100)),
        data_index=rng.randrange(2**64),
        epoch=rng.randrange(3),
        num_samples=rng.randint(1, 16),
        issue_version=rng.randrange(10),
        issued_at=1.7e9,
        temperature=rng.choice([0.5, 1.0, 1.5]),
        max_new_tokens=rng.randint(1, 512),
    )


_rng = random.Random(0)
VALID_GROUPS = [_valid_group(_rng) for _ in range(64)]
VALID_TASKS = [_valid_task(_rng) for _ in range(64)]
VALID_ENCODINGS = [encode_group(g) for g in VALID_GROUPS] + [encode_task(t) for t in VALID_TASKS]

# -- structurally valid messages with fields set to good and bad values -----------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
any_float = st.floats(width=32)
any_double = st.floats()
ids = st.sampled_from(["", "a", "run-b", RUN, "x" * 40, "\u00e9\u4e2d"])
schema = st.sampled_from([0, SCHEMA_VERSION, 2, 2**32 - 1])

GROUP_FIELDS = {
    "schema_version": schema,
    "run_id": ids,
    "rollout_id": ids,
    "task_id": ids,
    "prompt_id": ids,
    "generator_id": ids,
    "vocab_size": st.sampled_from([0, 300, 1000, 2**32 - 1]),
    "created_at": any_double,
}
TIMING_FIELDS = {"queue_s": any_double, "generate_s": any_double, "score_s": any_double}
COMPLETION_SCALARS = {"reward": any_float, "finish_reason": st.integers(0, 5)}
COMPLETION_LISTS = {"token_ids": u32, "logprobs": any_float, "versions": u64}


@st.composite
def corrupted_groups(draw: st.DrawFn) -> bytes:
    g = rollout_pb2.RolloutGroup()
    g.CopyFrom(VALID_GROUPS[draw(st.integers(0, len(VALID_GROUPS) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["group", "timings", "completion", "list", "prompt", "drop"]))
        if where == "group":
            name = draw(st.sampled_from(sorted(GROUP_FIELDS)))
            setattr(g, name, draw(GROUP_FIELDS[name]))
        elif where == "timings":
            name = draw(st.sampled_from(sorted(TIMING_FIELDS)))
            setattr(g.timings, name, draw(TIMING_FIELDS[name]))
        elif where == "prompt":
            g.prompt_token_ids[:] = draw(st.lists(u32, max_size=4))
        elif where == "drop":
            del g.completions[draw(st.integers(0, len(g.completions))) :]
        elif g.completions:
            c = g.completions[draw(st.integers(0, len(g.completions) - 1))]
            if where == "completion":
                name = draw(st.sampled_from(sorted(COMPLETION_SCALARS)))
                setattr(c, name, draw(COMPLETION_SCALARS[name]))
            else:
                name = draw(st.sampled_from(sorted(COMPLETION_LISTS)))
                values = getattr(c, name)
                if draw(st.booleans()) and values:
                    values[draw(st.integers(0, len(values) - 1))] = draw(COMPLETION_LISTS[name])
                else:
                    values[:] = draw(st.lists(COMPLETION_LISTS[name], max_size=7))
    return g.SerializeToString()


TASK_FIELDS = {
    "schema_version": schema,
    "run_id": ids,
    "task_id": ids,
    "prompt_id": ids,
    "num_samples": u32,
    "max_new_tokens": u32,
    "temperature": any_float,
    "issued_at": any_double,
    "prompt": st.text(max_size=20),
}


@st.composite
def corrupted_tasks(draw: st.DrawFn) -> bytes:
    t = rollout_pb2.PromptTask()
    t.CopyFrom(VALID_TASKS[draw(st.integers(0, len(VALID_TASKS) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(TASK_FIELDS)))
        setattr(t, name, draw(TASK_FIELDS[name]))
    return t.SerializeToString()


# -- byte-level mutations of valid encodings -------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_ENCODINGS[draw(st.integers(0, len(VALID_ENCODINGS) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set", "splice"]))
        if not data:
            data = bytearray(draw(st.binary(min_size=1, max_size=8)))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12]))
        else:
            data += data[i:]
    return bytes(data)


def valid_encoding(index: int) -> bytes:
    return VALID_ENCODINGS[index]


payloads = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=256)),
    st.tuples(st.just("mutated"), mutated()),
    st.tuples(st.just("valid"), st.integers(0, len(VALID_ENCODINGS) - 1).map(valid_encoding)),
    st.tuples(st.just("structured"), corrupted_groups()),
    st.tuples(st.just("structured"), corrupted_tasks()),
)

# -- an independent statement of what an accepted message guarantees --------------------------------


def assert_group_invariants(g: rollout_pb2.RolloutGroup, vocab_size: int | None) -> None:
    assert g.schema_version == SCHEMA_VERSION
    assert g.run_id == RUN
    assert g.rollout_id and g.task_id and g.prompt_id and g.generator_id
    assert len(g.prompt_token_ids) >= 1 and 1 <= len(g.completions) <= MAX_COMPLETIONS
    assert g.data_index <= MAX_DATA_INDEX and g.issue_version <= MAX_VERSION
    if vocab_size is not None:
        assert g.vocab_size == vocab_size
        assert all(t < vocab_size for t in g.prompt_token_ids)
    for c in g.completions:
        assert len(c.token_ids) == len(c.logprobs) == len(c.versions) >= 1
        if vocab_size is not None:
            assert all(t < vocab_size for t in c.token_ids)
        assert all(LOGPROB_FLOOR <= x <= LOGPROB_POSITIVE_TOLERANCE for x in c.logprobs)
        assert all(a <= b for a, b in zip(c.versions, c.versions[1:], strict=False))
        assert all(v <= MAX_VERSION for v in c.versions)
        assert abs(c.reward) <= MAX_ABS_REWARD
        assert c.finish_reason in (0, 1, 2)
    for x in (g.timings.queue_s, g.timings.generate_s, g.timings.score_s, g.created_at):
        assert math.isfinite(x)


def assert_task_invariants(t: rollout_pb2.PromptTask) -> None:
    assert t.schema_version == SCHEMA_VERSION
    assert t.run_id == RUN and t.task_id and t.prompt_id
    assert 1 <= t.num_samples <= MAX_COMPLETIONS and 1 <= t.max_new_tokens <= MAX_NEW_TOKENS
    assert MIN_TEMPERATURE <= t.temperature <= MAX_TEMPERATURE
    assert math.isfinite(t.issued_at)


def test_decoders_never_raise_anything_but_invalid_entry() -> None:
    outcomes: Counter[tuple[str, str, str]] = Counter()

    @settings(
        max_examples=MIN_PAYLOADS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        payload=payloads,
        max_bytes=st.sampled_from([1 << 20, 1 << 20, 1 << 20, 64]),
        vocab_size=st.sampled_from([None, 300, 1000]),
    )
    def check(payload: tuple[str, bytes], max_bytes: int, vocab_size: int | None) -> None:
        kind, data = payload
        try:
            g = decode_group(data, max_bytes=max_bytes, vocab_size=vocab_size, run_id=RUN)
        except InvalidEntry as e:
            assert e.reason in DLQ_REASONS and e.detail
            outcomes[(kind, "group", e.reason)] += 1
        else:
            assert_group_invariants(g, vocab_size)
            outcomes[(kind, "group", "ok")] += 1
        try:
            t = decode_task(data, max_bytes=max_bytes, run_id=RUN)
        except InvalidEntry as e:
            assert e.reason in DLQ_REASONS and e.detail
            outcomes[(kind, "task", e.reason)] += 1
        else:
            assert_task_invariants(t)
            outcomes[(kind, "task", "ok")] += 1

    check()

    num_payloads = sum(n for (_, target, _), n in outcomes.items() if target == "group")
    assert num_payloads >= MIN_PAYLOADS, f"only {num_payloads} payloads were tried"
    seen = {(kind, reason) for kind, _, reason in outcomes}
    kinds = {kind for kind, _ in seen}
    assert kinds == {"random", "mutated", "valid", "structured"}
    reasons = {reason for _, reason in seen}
    # "unexpected" is the learner's verdict on a well-formed group it did not ask for; the
    # decoders cannot know what was issued.
    decoder_reasons = set(DLQ_REASONS) - {"unexpected"}
    assert decoder_reasons | {"ok"} <= reasons, (
        f"reasons never produced: {decoder_reasons - reasons}"
    )

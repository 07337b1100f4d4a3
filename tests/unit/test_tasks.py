import re

import pytest

from lpreg_core.tasks import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_OPERAND,
    Problem,
    make_problems,
    problem_at,
    split_of,
    split_size,
)

PROMPT_RE = re.compile(r"^(\d+)([+\-*])(\d+)=$")


def _solve(prompt: str) -> int:
    match = PROMPT_RE.fullmatch(prompt)
    assert match is not None, prompt
    a, op, b = int(match[1]), match[2], int(match[3])
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_make_problems_is_deterministic():
    assert make_problems("train", 50, seed=3) == make_problems("train", 50, seed=3)
    assert make_problems("eval", 50, seed=3) == make_problems("eval", 50, seed=3)


def test_seeds_give_different_streams():
    first = [p.prompt for p in make_problems("train", 50, seed=0)]
    second = [p.prompt for p in make_problems("train", 50, seed=1)]
    assert first != second


def test_problem_at_is_random_access():
    stream = [problem_at(i, seed=5) for i in range(30)]
    assert [problem_at(i, seed=5) for i in range(10, 30)] == stream[10:]
    assert problem_at(10**9, seed=5) == problem_at(10**9, seed=5)


def test_prompt_format_and_answers():
    for problem in make_problems("train", 200, seed=0) + make_problems("eval", 200, seed=0):
        assert isinstance(problem, Problem)
        assert PROMPT_RE.fullmatch(problem.prompt)
        assert problem.answer == str(_solve(problem.prompt))
        assert int(problem.answer) >= 0
        # answer digits plus <eos> fit in the default generation budget
        assert len(problem.answer) + 1 <= DEFAULT_MAX_NEW_TOKENS


def test_operands_respect_difficulty():
    problems = make_problems("train", 40, seed=0, max_operand=9, operators="*")
    for problem in problems:
        a, b = problem.prompt[:-1].split("*")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
    default = make_problems("train", 300, seed=0)
    operands = [int(x) for p in default for x in re.split(r"[+\-*]", p.prompt[:-1])]
    assert max(operands) <= DEFAULT_MAX_OPERAND
    assert {p.prompt[len(p.prompt.rstrip("=0123456789")) - 1] for p in default} <= {"+", "-"}


def test_splits_are_disjoint_across_seeds():
    train = {p.prompt for seed in range(3) for p in make_problems("train", 500, seed=seed)}
    evaluation = {p.prompt for seed in range(3) for p in make_problems("eval", 300, seed=seed)}
    assert train.isdisjoint(evaluation)
    assert all(split_of(prompt) == "train" for prompt in train)
    assert all(split_of(prompt) == "eval" for prompt in evaluation)


def test_stream_stays_in_its_split():
    assert all(split_of(problem_at(i, 0, "eval").prompt) == "eval" for i in range(200))
    assert all(split_of(problem_at(i, 0, "train").prompt) == "train" for i in range(200))


def test_make_problems_are_distinct_with_unique_ids():
    problems = make_problems("eval", 500, seed=0)
    assert len({p.prompt for p in problems}) == 500
    assert len({p.prompt_id for p in problems}) == 500


def test_split_sizes_cover_the_problem_space():
    # 0..3 with "+" gives 16 problems, "-" with a >= b gives 10
    total = split_size("train", max_operand=3, operators="+-") + split_size(
        "eval", max_operand=3, operators="+-"
    )
    assert total == 26


def test_asking_for_more_than_the_split_raises():
    available = split_size("eval", max_operand=3, operators="+")
    assert len(make_problems("eval", available, seed=0, max_operand=3, operators="+")) == available
    with pytest.raises(ValueError, match="distinct"):
        make_problems("eval", available + 1, seed=0, max_operand=3, operators="+")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_operand": 0}, {"operators": ""}, {"operators": "/"}],
)
def test_invalid_difficulty_raises(kwargs):
    with pytest.raises(ValueError):
        problem_at(0, seed=0, **kwargs)


def test_negative_index_raises():
    with pytest.raises(ValueError):
        problem_at(-1, seed=0)

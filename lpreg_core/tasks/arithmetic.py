"""Small integer arithmetic: the built-in verifiable task of the tiny demo.

Format
------
A problem is ``"<a><op><b>="`` with no spaces, e.g. ``"23+58="``; its answer is the decimal
integer result, e.g. ``"81"``. Operands are drawn uniformly from ``0..max_operand``; for ``-`` the
operands are ordered so that the answer is never negative.

- The generator tokenizes ``problem.prompt`` with the task's tokenizer using its default
  ``add_special_tokens=True`` (the tiny tokenizer prepends ``<bos>`` itself), samples until
  ``<eos>`` or ``DEFAULT_MAX_NEW_TOKENS`` new tokens, decodes the completion with
  ``skip_special_tokens=True`` and scores it with ``ExactMatchVerifier`` (``"exact_match"``).
- A correct completion is the answer's digits followed by ``<eos>``: ``"23+58="`` -> ``"81"``.

Splits
------
Which split a problem belongs to is a pure function of its prompt text (a SHA-256 bucket),
independent of the seed, so ``train`` and ``eval`` never share a problem under any seeds.
``problem_at(index, seed)`` is an infinite, deterministic stream indexed by position, so a learner
can resume at a data position; ``make_problems`` returns distinct problems of one split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Split = Literal["train", "eval"]

DEFAULT_MAX_OPERAND = 99
DEFAULT_OPERATORS = "+-"
SUPPORTED_OPERATORS = "+-*"
# One bucket in EVAL_BUCKETS of the problem space is held out for evaluation.
EVAL_BUCKETS = 10
# The longest default answer is "198" (3 tokens) plus <eos>; the slack lets a wrong, long
# completion end on its own instead of being cut at the answer length.
DEFAULT_MAX_NEW_TOKENS = 8
# Longest default prompt "99+99=" (6 tokens) plus <bos>.
DEFAULT_MAX_PROMPT_TOKENS = 7
# A stream position that finds no problem of its split after this many draws means the
# difficulty settings leave the split (nearly) empty.
MAX_DRAWS_PER_PROBLEM = 10_000


@dataclass(frozen=True)
class Problem:
    """One task instance: the text the policy continues and the gold answer."""

    prompt_id: str
    prompt: str
    answer: str


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to; depends on the text only."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else "train"


def _check_difficulty(max_operand: int, operators: str) -> None:
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if not operators or any(op not in SUPPORTED_OPERATORS for op in operators):
        raise ValueError(
            f"operators must be a non-empty string over {SUPPORTED_OPERATORS!r}, got {operators!r}"
        )


def _render(a: int, op: str, b: int) -> tuple[str, str]:
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    else:
        result = a * b
    return f"{a}{op}{b}=", str(result)


def _draw(rng: random.Random, max_operand: int, operators: str) -> tuple[str, str]:
    op = rng.choice(operators)
    a = rng.randint(0, max_operand)
    b = rng.randint(0, max_operand)
    if op == "-" and a < b:
        a, b = b, a
    return _render(a, op, b)


def problem_at(
    index: int,
    seed: int,
    split: Split = "train",
    *,
    max_operand: int = DEFAULT_MAX_OPERAND,
    operators: str = DEFAULT_OPERATORS,
) -> Problem:
    """The problem at position ``index`` of the infinite stream ``(split, seed)``.

    Positions are independent draws (with replacement), so any index can be computed directly.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    _check_difficulty(max_operand, operators)
    rng = random.Random(f"lpreg-arithmetic/{split}/{seed}/{index}")
    for _ in range(MAX_DRAWS_PER_PROBLEM):
        prompt, answer = _draw(rng, max_operand, operators)
        if split_of(prompt) == split:
            return Problem(prompt_id=f"arith-{split}-{seed}-{index}", prompt=prompt, answer=answer)
    raise ValueError(
        f"no {split} problem found in {MAX_DRAWS_PER_PROBLEM} draws "
        f"(max_operand={max_operand}, operators={operators!r}); widen the difficulty"
    )


@lru_cache(maxsize=32)
def split_size(split: Split, *, max_operand: int, operators: str) -> int:
    """Number of distinct problems in ``split`` for the given difficulty."""
    _check_difficulty(max_operand, operators)
    prompts = set()
    for op in operators:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                prompts.add(_render(a, op, b)[0])
    return sum(1 for prompt in prompts if split_of(prompt) == split)


def make_problems(
    split: Split,
    num: int,
    seed: int,
    *,
    max_operand: int = DEFAULT_MAX_OPERAND,
    operators: str = DEFAULT_OPERATORS,
) -> list[Problem]:
    """``num`` distinct problems of ``split``: the first distinct prompts of stream ``(split, seed)``."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    available = split_size(split, max_operand=max_operand, operators=operators)
    if num > available:
        raise ValueError(
            f"asked for {num} distinct {split} problems but the split holds {available} "
            f"(max_operand={max_operand}, operators={operators!r})"
        )
    problems: list[Problem] = []
    seen: set[str] = set()
    index = 0
    while len(problems) < num:
        problem = problem_at(index, seed, split, max_operand=max_operand, operators=operators)
        index += 1
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems

"""Verifiable tasks: deterministic problem generators with gold answers."""

from lpreg_core.tasks.arithmetic import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_OPERAND,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_OPERATORS,
    Problem,
    Split,
    make_problems,
    problem_at,
    split_of,
    split_size,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_OPERAND",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "DEFAULT_OPERATORS",
    "Problem",
    "Split",
    "make_problems",
    "problem_at",
    "split_of",
    "split_size",
]

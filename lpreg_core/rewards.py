"""Verifiable rewards: a completion is scored 1.0 if its answer matches the gold answer, else 0.0.

Verifiers never raise on model output: any failure to parse or compare scores 0.0.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

VerifierName = Literal["exact_match", "math"]

CORRECT = 1.0
INCORRECT = 0.0
# Parsing cost grows with the text; final answers sit at the end of a completion, so only its
# tail is handed to the parser.
MAX_MATH_COMPLETION_CHARS = 8_192
# math-verify's own default budget per parse and per comparison (whole seconds: signal.alarm).
DEFAULT_MATH_TIMEOUT_S = 5
# Every completion of a group shares one gold answer; parsed golds are kept for reuse.
GOLD_CACHE_SIZE = 4_096


@runtime_checkable
class Verifier(Protocol):
    """Scores one completion against the gold answer of its problem."""

    def score(self, completion: str, answer: str) -> float:
        """1.0 if ``completion`` answers ``answer`` correctly, else 0.0; never raises."""
        ...


class ExactMatchVerifier:
    """The completion's text up to the first newline (or a literal EOS marker), stripped, must
    equal the stripped answer exactly.

    Generators decode with special tokens skipped, so the EOS token is normally absent from the
    text; ``eos_text`` covers completions decoded with special tokens kept.
    """

    def __init__(self, eos_text: str | None = "<eos>") -> None:
        self.eos_text = eos_text

    def extract(self, completion: str) -> str:
        """The answer part of a completion."""
        text = completion
        if self.eos_text:
            text = text.split(self.eos_text, 1)[0]
        return text.split("\n", 1)[0].strip()

    def score(self, completion: str, answer: str) -> float:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return INCORRECT
        gold = answer.strip()
        if not gold:
            return INCORRECT
        return CORRECT if self.extract(completion) == gold else INCORRECT


class MathVerifier:
    """Mathematical equivalence via math-verify: ``\\boxed{}`` answers, fractions, decimals, LaTeX.

    The gold answer may be plain (``1/2``), LaTeX (``\\frac{1}{2}``) or already boxed/delimited.
    math-verify enforces its timeouts with ``signal.alarm``, which only works in the main thread
    of the main interpreter; elsewhere (generator worker threads, asyncio executors) the timeouts
    are switched off for the call instead of failing every score.
    """

    def __init__(self, timeout_s: int | None = DEFAULT_MATH_TIMEOUT_S) -> None:
        if timeout_s is not None and timeout_s < 1:
            raise ValueError(f"timeout_s must be None or >= 1 (signal.alarm), got {timeout_s}")
        self.timeout_s = timeout_s

    def _effective_timeout_s(self) -> int | None:
        if threading.current_thread() is threading.main_thread():
            return self.timeout_s
        return None

    def score(self, completion: str, answer: str) -> float:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return INCORRECT
        try:
            from math_verify import parse, verify

            timeout_s = self._effective_timeout_s()
            gold = _parse_gold(answer.strip(), timeout_s)
            if not gold:
                logger.warning("gold answer %r could not be parsed; scoring 0.0", answer[:200])
                return INCORRECT
            prediction = parse(completion[-MAX_MATH_COMPLETION_CHARS:], parsing_timeout=timeout_s)
            if not prediction:
                return INCORRECT
            return (
                CORRECT if verify(list(gold), prediction, timeout_seconds=timeout_s) else INCORRECT
            )
        except Exception:  # a reward must never take the generator down
            logger.debug("math verification failed; scoring 0.0", exc_info=True)
            return INCORRECT


@lru_cache(maxsize=GOLD_CACHE_SIZE)
def _parse_gold(answer: str, timeout_s: int | None) -> tuple:
    from math_verify import parse

    if not answer:
        return ()
    if "\\boxed" in answer or "$" in answer:
        return tuple(parse(answer, parsing_timeout=timeout_s))
    gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    return tuple(gold or parse(answer, parsing_timeout=timeout_s))


def make_verifier(name: VerifierName) -> Verifier:
    """The verifier registered under ``name``."""
    if name == "exact_match":
        return ExactMatchVerifier()
    if name == "math":
        return MathVerifier()
    raise ValueError(f"unknown verifier {name!r}; expected 'exact_match' or 'math'")

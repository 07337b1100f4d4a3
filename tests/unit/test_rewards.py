import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lpreg_core.rewards import ExactMatchVerifier, MathVerifier, Verifier, make_verifier

GARBAGE = [
    "",
    " ",
    "\n\n\n",
    "\\boxed{",
    "\\boxed{}",
    "}}}{{\\frac",
    "$$$",
    "\\frac{1}{0}",
    "1/0",
    "\\boxed{\\boxed{\\boxed{1",
    "\x00\x01\x02",
    "∞ ≠ ∅ \U0001f600",
    "9" * 5_000,
    "\\left(" * 200,
    "x" * 20_000 + "\\boxed{2}",
]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("81", 1.0),
        (" 81 ", 1.0),
        ("81\n", 1.0),
        ("81\n7+3=10", 1.0),
        ("81<eos><pad>", 1.0),
        ("810", 0.0),
        ("8 1", 0.0),
        ("82", 0.0),
        ("", 0.0),
        ("\n81", 0.0),
    ],
)
def test_exact_match(completion, expected):
    assert ExactMatchVerifier().score(completion, "81") == expected


def test_exact_match_strips_the_answer_and_rejects_empty_gold():
    verifier = ExactMatchVerifier()
    assert verifier.score("42", " 42\n") == 1.0
    assert verifier.score("", "") == 0.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The answer is \\boxed{1/2}.", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("so we get $\\frac{1}{2}$", "1/2"),
        ("\\boxed{\\frac{2}{4}}", "\\boxed{\\frac{1}{2}}"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{81}", "81"),
        ("81", "81"),
        ("\\boxed{x + 1}", "1 + x"),
    ],
)
def test_math_verifier_accepts_equivalent_answers(completion, answer):
    assert MathVerifier().score(completion, answer) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("\\boxed{1/3}", "0.5"),
        ("\\boxed{82}", "81"),
        ("no answer here", "81"),
        ("\\boxed{2}", "\\sqrt{2}"),
    ],
)
def test_math_verifier_rejects_wrong_answers(completion, answer):
    assert MathVerifier().score(completion, answer) == 0.0


@pytest.mark.parametrize("verifier", [ExactMatchVerifier(), MathVerifier()])
@pytest.mark.parametrize("completion", GARBAGE)
def test_garbage_never_raises(verifier, completion):
    assert verifier.score(completion, "2") in (0.0, 1.0)
    # as a gold answer, kept short: pathological golds only cost time up to the parse timeout
    assert verifier.score("2", completion[:64]) in (0.0, 1.0)


@pytest.mark.parametrize("verifier", [ExactMatchVerifier(), MathVerifier()])
def test_non_string_inputs_score_zero(verifier):
    assert verifier.score(None, "2") == 0.0  # type: ignore[arg-type]
    assert verifier.score("2", 2) == 0.0  # type: ignore[arg-type]


def test_math_verifier_works_outside_the_main_thread():
    verifier = MathVerifier()
    results: list[float] = []
    thread = threading.Thread(target=lambda: results.append(verifier.score("\\boxed{1/2}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(verifier.score, ["\\boxed{3}", "\\boxed{4}"] * 4, ["3"] * 8))
    assert scores == [1.0, 0.0] * 4


def test_math_verifier_rejects_sub_second_timeouts():
    with pytest.raises(ValueError):
        MathVerifier(timeout_s=0)
    assert MathVerifier(timeout_s=None).score("\\boxed{2}", "2") == 1.0


def test_make_verifier():
    assert isinstance(make_verifier("exact_match"), ExactMatchVerifier)
    assert isinstance(make_verifier("math"), MathVerifier)
    assert isinstance(make_verifier("exact_match"), Verifier)
    assert isinstance(make_verifier("math"), Verifier)
    with pytest.raises(ValueError, match="unknown verifier"):
        make_verifier("regex")  # type: ignore[arg-type]

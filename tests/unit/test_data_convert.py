"""`lpreg data convert`: DAPO-Math-17k, MATH-500 and AIME rows into the jsonl task's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpreg_core.config import JsonlTaskConfig
from lpreg_core.data import make_source
from services.data.convert import convert, detect_layout

DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "Solve 2x = 14. Answer: $x$"},
    ],
    "ability": "MATH",
    "reward_model": {"ground_truth": "7", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "a1"},
}


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dapo_layout_becomes_top_level_strings(tmp_path: Path) -> None:
    src = _write(tmp_path / "dapo.jsonl", [DAPO_ROW, DAPO_ROW])
    out = tmp_path / "out" / "dapo.jsonl"
    assert convert(src, out) == 2
    assert _read(out)[0] == {"prompt": "Solve 2x = 14. Answer: $x$", "answer": "7"}
    # The result is what the jsonl task reads.
    source = make_source(JsonlTaskConfig(path=str(out)))
    assert source.at(0).problem.answer == "7"


@pytest.mark.parametrize(
    ("row", "layout", "expected"),
    [
        ({"problem": "1+1?", "answer": "2", "subject": "x"}, "math500", ("1+1?", "2")),
        ({"Problem": "2+2?", "Answer": 4}, "aime-capitalised", ("2+2?", "4")),
        ({"prompt": "3+3?", "answer": "6"}, "plain", ("3+3?", "6")),
    ],
)
def test_other_layouts(tmp_path: Path, row: dict, layout: str, expected: tuple[str, str]) -> None:
    assert detect_layout(row) == layout
    out = tmp_path / "o.jsonl"
    convert(_write(tmp_path / "i.jsonl", [row]), out)
    assert _read(out) == [{"prompt": expected[0], "answer": expected[1]}]


def test_explicit_fields_and_limit(tmp_path: Path) -> None:
    rows = [{"q": {"text": f"{i}?"}, "a": i} for i in range(5)]
    out = tmp_path / "o.jsonl"
    n = convert(
        _write(tmp_path / "i.jsonl", rows), out, prompt_field="q.text", answer_field="a", limit=3
    )
    assert n == 3 and _read(out)[2] == {"prompt": "2?", "answer": "2"}


def test_unknown_layout_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--layout or --prompt-field"):
        convert(_write(tmp_path / "i.jsonl", [{"x": 1}]), tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()

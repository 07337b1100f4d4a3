from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpreg_core.config import ArithmeticTaskConfig, JsonlTaskConfig
from lpreg_core.data import make_source


def test_arithmetic_source_is_deterministic_and_resumable() -> None:
    a = make_source(ArithmeticTaskConfig(seed=3))
    b = make_source(ArithmeticTaskConfig(seed=3))
    assert [a.at(i).problem for i in range(20)] == [b.at(i).problem for i in range(20)]
    assert b.at(17).data_index == 17
    eval_prompts = {p.prompt for p in a.eval_problems(50)}
    assert not eval_prompts & {a.at(i).problem.prompt for i in range(500)}


def test_jsonl_source_shuffles_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": i}) for i in range(5)) + "\n")
    src = make_source(
        JsonlTaskConfig(
            path=str(path), prompt_field="q", answer_field="a", prompt_template="Q: {prompt}"
        )
    )
    first = [src.at(i).problem.prompt for i in range(5)]
    second = [src.at(i).problem.prompt for i in range(5, 10)]
    assert sorted(first) == sorted(second) == [f"Q: q{i}" for i in range(5)]
    assert src.at(7).epoch == 1


def test_jsonl_source_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "x", "answer": 1}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:2"):
        make_source(JsonlTaskConfig(path=str(path)))

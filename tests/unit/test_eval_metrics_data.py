"""`lpreg eval` pieces without a model: pass@k against enumeration, data layouts, field mapping."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from lpreg_core.config import load_config
from services.eval.data import FieldMap, load_problems, prompt_text, resolve_field
from services.eval.main import field_map
from services.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k
from services.eval.runner import pass_ks

ROOT = Path(__file__).resolve().parents[2]


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them right) that hold a right one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_subsets(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))


def test_pass_at_k_hand_values_and_errors() -> None:
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="out of range"):
        pass_at_k(4, 5, 1)


def test_avg_and_mean_pass_at_k_over_problems() -> None:
    correct = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    assert avg_at_k(correct) == pytest.approx(5 / 12)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)


def test_pass_ks_are_powers_of_two_and_n() -> None:
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_project_layout_with_template(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    [problem] = load_problems(path, FieldMap(prompt_template="Q: {prompt}"))
    assert (problem.prompt, problem.answer, problem.prompt_id) == ("Q: 1+2=", "3", "p-1")


def test_dapo_math_17k_layout(tmp_path: Path) -> None:
    row = {
        "data_source": "math_dapo",
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Solve x + 1 = 3."},
        ],
        "ability": "MATH",
        "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a1"},
    }
    path = _write_jsonl(tmp_path / "dapo.jsonl", [row, row])
    fields = FieldMap(prompt_field="prompt", answer_field="reward_model.ground_truth")
    problems = load_problems(path, fields, limit=1)
    assert len(problems) == 1
    assert (problems[0].prompt, problems[0].answer) == ("Solve x + 1 = 3.", "2")


def test_aime_and_math500_layouts(tmp_path: Path) -> None:
    aime = _write_jsonl(
        tmp_path / "aime.jsonl",
        [{"ID": "2024-I-1", "Problem": "Find n.", "Solution": "...", "Answer": 204}],
    )
    [p] = load_problems(aime, FieldMap(prompt_field="Problem", answer_field="Answer"))
    assert (p.prompt, p.answer) == ("Find n.", "204")
    math500 = _write_jsonl(
        tmp_path / "math500.jsonl",
        [{"problem": "Compute 1/2 + 1/2.", "solution": "...", "answer": "1", "level": 1}],
    )
    [q] = load_problems(math500, FieldMap(prompt_field="problem", answer_field="answer"))
    assert (q.prompt, q.answer) == ("Compute 1/2 + 1/2.", "1")


def test_field_paths_and_chat_prompts() -> None:
    row = {"a": [{"b": "x"}, {"b": "y"}]}
    assert resolve_field(row, "a.1.b") == "y"
    assert resolve_field(row, "a.-1.b") == "y"
    with pytest.raises(KeyError, match="no key 'c'"):
        resolve_field(row, "c")
    with pytest.raises(KeyError, match="bad list index"):
        resolve_field(row, "a.7")
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(TypeError):
        prompt_text({"content": "hi"})


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'answer'"):
        load_problems(path, FieldMap())
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not JSON"):
        load_problems(tmp_path / "broken.jsonl", FieldMap())
    with pytest.raises(ValueError, match="unknown data format"):
        load_problems(_write_jsonl(tmp_path / "x.csv", [{}]), FieldMap())
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl", FieldMap())


def test_parquet_reads_with_pyarrow_or_says_how_to_get_it(tmp_path: Path) -> None:
    path = tmp_path / "math500.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(RuntimeError, match="pip install pyarrow"):
            load_problems(path, FieldMap(prompt_field="problem"))
        return
    pq.write_table(pa.table({"problem": ["1+1?"], "answer": ["2"]}), path)
    [p] = load_problems(path, FieldMap(prompt_field="problem"))
    assert (p.prompt, p.answer) == ("1+1?", "2")


def test_field_map_comes_from_the_task_config_unless_given() -> None:
    study = load_config(ROOT / "examples" / "study" / "config.yaml")
    assert field_map(study) == FieldMap("prompt", "answer", "{prompt}")
    custom = load_config(
        ROOT / "examples" / "study" / "config.yaml",
        ["task.answer_field=reward_model.ground_truth", "task.prompt_template=Q {prompt}"],
    )
    assert field_map(custom) == FieldMap("prompt", "reward_model.ground_truth", "Q {prompt}")
    assert field_map(custom, answer_field="Answer").answer_field == "Answer"
    tiny = load_config(ROOT / "examples" / "tiny" / "config.yaml")
    assert field_map(tiny) == FieldMap()

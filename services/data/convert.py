"""`lpreg data convert IN OUT`: math data sets into the ``jsonl`` task's layout, one
``{"prompt": ..., "answer": ...}`` object per line (top-level strings, what the task reads).

Layouts (``--layout``, default ``auto`` picks by the first row's keys):

    dapo      DAPO-Math-17k: prompt is a chat message list, answer in reward_model.ground_truth
    math500   MATH-500: problem, answer
    aime      AIME 2024/2025: problem (or Problem), answer (or Answer)
    plain     already prompt / answer

Or name the fields yourself: ``--prompt-field prompt --answer-field reward_model.ground_truth``.
Input is JSON lines or Parquet (Parquet needs ``pip install pyarrow``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.eval.data import FieldMap, _rows, load_problems

LAYOUTS = {
    "dapo": ("prompt", "reward_model.ground_truth"),
    "math500": ("problem", "answer"),
    "aime": ("problem", "answer"),
    "aime-capitalised": ("Problem", "Answer"),
    "plain": ("prompt", "answer"),
}


def detect_layout(row: Any) -> str:
    if not isinstance(row, dict):
        raise ValueError("rows must be JSON objects")
    if "reward_model" in row and "prompt" in row:
        return "dapo"
    if "problem" in row and "answer" in row:
        return "math500"
    if "Problem" in row and "Answer" in row:
        return "aime-capitalised"
    if "prompt" in row and "answer" in row:
        return "plain"
    raise ValueError(
        f"cannot tell the layout from the keys {sorted(row)}; pass --layout or "
        "--prompt-field/--answer-field"
    )


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="JSON-lines or Parquet file")
    p.add_argument("output", help="JSON-lines file to write (the jsonl task's task.path)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto")
    p.add_argument("--prompt-field", default=None, help="dotted path, e.g. prompt.0.content")
    p.add_argument("--answer-field", default=None, help="dotted path, e.g. answer")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N rows")


def convert(
    input_path: Path,
    output_path: Path,
    layout: str = "auto",
    prompt_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> int:
    """Write OUT from IN; returns the number of problems written."""
    if layout == "auto" and not (prompt_field and answer_field):
        first = next(iter(_rows(input_path)), None)
        if first is None:
            raise ValueError(f"{input_path} holds no rows")
        layout = detect_layout(first[1])
    default_prompt, default_answer = LAYOUTS.get(layout, ("prompt", "answer"))
    fields = FieldMap(prompt_field or default_prompt, answer_field or default_answer)
    problems = load_problems(input_path, fields, limit)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}, ensure_ascii=False) + "\n")
    tmp.replace(output_path)
    return len(problems)


def run_convert(args: argparse.Namespace) -> int:
    try:
        n = convert(
            Path(args.input),
            Path(args.output),
            args.layout,
            args.prompt_field,
            args.answer_field,
            args.limit,
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"lpreg data convert: {e}", file=sys.stderr)
        return 1
    print(
        f"lpreg data convert: wrote {n} problems to {args.output} "
        f"(use: task: {{type: jsonl, path: {args.output}}})"
    )
    return 0

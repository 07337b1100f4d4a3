"""Evaluation problems from JSON-lines or Parquet files, with the prompt and answer fields mapped.

Torch-free on purpose: it only reads rows and picks two fields out of each.

A field is a dotted path into a row: ``answer``, ``reward_model.ground_truth``, ``prompt.0.content``
(integer parts index lists, ``-1`` the last item). When the value at the prompt path is a chat
message list (``[{"role": "user", "content": ...}, ...]``), the prompt is the content of its last
user message. The layouts of the usual math sets:

    DAPO-Math-17k   prompt_field=prompt   answer_field=reward_model.ground_truth
    MATH-500        prompt_field=problem  answer_field=answer
    AIME 2024/2025  prompt_field=problem (or Problem)  answer_field=answer (or Answer)
    this project    prompt_field=prompt   answer_field=answer

Parquet needs pyarrow (``pip install pyarrow``); JSON-lines needs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EvalProblem", "FieldMap", "load_problems", "resolve_field", "prompt_text"]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class EvalProblem:
    """One evaluation item: the text the policy continues and the gold answer."""

    prompt_id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class FieldMap:
    """Where a row keeps its prompt and answer, and how the prompt is wrapped."""

    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str = "{prompt}"


def resolve_field(row: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``row``; KeyError naming the missing part."""
    value = row
    for part in path.split("."):
        if isinstance(value, Mapping):
            if part not in value:
                keys = ", ".join(sorted(map(str, value)))
                raise KeyError(f"field {path!r}: no key {part!r} (keys: {keys})")
            value = value[part]
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
            try:
                value = value[int(part)]
            except (ValueError, IndexError) as e:
                raise KeyError(f"field {path!r}: bad list index {part!r} ({e})") from None
        else:
            raise KeyError(f"field {path!r}: {part!r} indexes a {type(value).__name__}")
    return value


def prompt_text(value: Any) -> str:
    """A prompt value as text: strings as they are, chat message lists by their last user turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        users = [m for m in value if m.get("role") == "user"]
        message = users[-1] if users else value[-1]
        if isinstance(message.get("content"), str):
            return str(message["content"])
    raise TypeError(f"prompt must be text or a chat message list, got {type(value).__name__}")


def _answer_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise TypeError(f"answer must be text or a number, got {value!r}")
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, Sequence) and len(value) == 1:
        return _answer_text(value[0])
    raise TypeError(f"answer must be text or a number, got {type(value).__name__}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from e


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file "
            f"to JSON lines ({e})"
        ) from e
    yield from enumerate(pq.read_table(path).to_pylist())


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _parquet_rows(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path)
    raise ValueError(
        f"{path}: unknown data format {suffix!r}; expected one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


def load_problems(
    path: str | Path, fields: FieldMap, limit: int | None = None
) -> list[EvalProblem]:
    """The first ``limit`` (all if None) problems of a JSON-lines or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    out: list[EvalProblem] = []
    for position, row in _rows(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{position}"
        try:
            prompt = prompt_text(resolve_field(row, fields.prompt_field))
            answer = _answer_text(resolve_field(row, fields.answer_field))
            text = fields.prompt_template.format(prompt=prompt)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            # str(KeyError) quotes its message; show the message itself.
            detail = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ValueError(f"{where}: {detail}") from e
        out.append(EvalProblem(prompt_id=f"{path.stem}-{position}", prompt=text, answer=answer))
    if not out:
        raise ValueError(f"{path} holds no problems")
    return out

"""Prompt sources: a deterministic, resumable sequence of (data_index, problem) pairs."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lpreg_core.config import ArithmeticTaskConfig, JsonlTaskConfig
from lpreg_core.tasks.arithmetic import Problem, make_problems, problem_at


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the training stream at a given data position."""

    data_index: int
    epoch: int
    problem: Problem


class ArithmeticSource:
    """The built-in arithmetic task: an infinite stream, one epoch."""

    def __init__(self, config: ArithmeticTaskConfig) -> None:
        self._config = config

    def at(self, data_index: int) -> PromptItem:
        c = self._config
        problem = problem_at(
            data_index, c.seed, "train", max_operand=c.max_operand, operators=c.operators
        )
        return PromptItem(data_index=data_index, epoch=0, problem=problem)

    def eval_problems(self, num: int) -> list[Problem]:
        c = self._config
        return make_problems("eval", num, c.seed, max_operand=c.max_operand, operators=c.operators)


class JsonlSource:
    """Prompts from a JSON-lines file, reshuffled deterministically every epoch."""

    def __init__(self, config: JsonlTaskConfig) -> None:
        self._config = config
        self._problems: list[Problem] = []
        path = Path(config.path)
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = config.prompt_template.format(prompt=row[config.prompt_field])
                answer = str(row[config.answer_field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad task line: {e!r}") from e
            self._problems.append(
                Problem(prompt_id=f"{path.stem}-{lineno}", prompt=prompt, answer=answer)
            )
        if not self._problems:
            raise ValueError(f"{path} holds no prompts")
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._problems)))
            random.Random(f"{self._config.shuffle_seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def at(self, data_index: int) -> PromptItem:
        epoch, pos = divmod(data_index, len(self._problems))
        return PromptItem(data_index, epoch, self._problems[self._order(epoch)[pos]])

    def eval_problems(self, num: int) -> list[Problem]:
        return self._problems[: min(num, len(self._problems))]


PromptSource = ArithmeticSource | JsonlSource


def make_source(config: ArithmeticTaskConfig | JsonlTaskConfig) -> PromptSource:
    if isinstance(config, ArithmeticTaskConfig):
        return ArithmeticSource(config)
    return JsonlSource(config)

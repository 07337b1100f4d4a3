"""``lpreg eval``: accuracy of a checkpoint on a data file, as a table and as JSON.

    lpreg eval examples/study/config.yaml --checkpoint examples/study/model \\
        --data examples/study/eval.jsonl --num-samples 8 --out eval.json
    lpreg eval examples/tiny/config.yaml --checkpoint runs/tiny/checkpoints --data aime24.parquet \\
        --prompt-field problem --answer-field answer --verifier math --set generator.backend.type=vllm

The model architecture and tokenizer of a learner checkpoint come from the config's model.path;
the backend (hf or vllm) from generator.backend; sampling defaults from sampling.*; the prompt
and answer fields, prompt template and verifier from task.* (jsonl tasks) unless given here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lpreg_core.config import JsonlTaskConfig, ModelConfig, RunConfig
from lpreg_core.rewards import VerifierName, make_verifier
from services.eval.checkpoint import materialize_checkpoint
from services.eval.data import EvalProblem, FieldMap, load_problems
from services.eval.runner import EvalReport, EvalSettings, evaluate

__all__ = ["EvalRequest", "evaluate_model_dir", "field_map", "run_eval"]


@dataclass(frozen=True)
class EvalRequest:
    checkpoint: str
    data: str
    fields: FieldMap
    verifier: VerifierName
    settings: EvalSettings
    seed: int
    limit: int | None = None


def field_map(
    config: RunConfig,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    prompt_template: str | None = None,
) -> FieldMap:
    """Field mapping from the task config (jsonl tasks), with explicit values taking precedence."""
    task = config.task
    base = (
        FieldMap(task.prompt_field, task.answer_field, task.prompt_template)
        if isinstance(task, JsonlTaskConfig)
        else FieldMap()
    )
    return FieldMap(
        prompt_field or base.prompt_field,
        answer_field or base.answer_field,
        prompt_template or base.prompt_template,
    )


def _request_from_args(config: RunConfig, args: argparse.Namespace) -> EvalRequest:
    sampling = config.sampling
    settings = EvalSettings(
        num_samples=args.num_samples or sampling.num_samples,
        temperature=args.temperature if args.temperature is not None else sampling.temperature,
        max_new_tokens=args.max_new_tokens or sampling.max_new_tokens,
        greedy=not args.no_greedy,
    )
    return EvalRequest(
        checkpoint=args.checkpoint,
        data=args.data,
        fields=field_map(config, args.prompt_field, args.answer_field, args.prompt_template),
        verifier=args.verifier or config.task.verifier,
        settings=settings,
        seed=args.seed if args.seed is not None else config.generator.seed,
        limit=args.limit,
    )


def evaluate_model_dir(
    config: RunConfig,
    model_dir: str | Path,
    problems: list[EvalProblem],
    verifier: VerifierName,
    settings: EvalSettings,
    seed: int,
    progress: Progress | None = None,
) -> EvalReport:
    """Build the config's backend on ``model_dir`` and evaluate ``problems`` with it."""
    from services.generator.backends import make_backend

    model = ModelConfig(path=str(model_dir), dtype=config.model.dtype)
    backend = make_backend(config.generator.backend, model, seed=seed)
    try:
        passes = 2 if settings.greedy else 1
        task = (
            progress.add_task("eval", total=passes * len(problems))
            if progress is not None
            else None
        )

        def advance(n: int) -> None:
            if progress is not None and task is not None:
                progress.advance(task, n)

        return evaluate(backend, problems, make_verifier(verifier), settings, on_progress=advance)
    finally:
        backend.close()


def _table(report: EvalReport) -> Table:
    table = Table(title=f"lpreg eval: {report.meta.get('data', '')}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("problems", report.num_problems),
        ("samples per problem (k)", report.num_samples),
        ("temperature", report.temperature),
        (f"avg@{report.num_samples}", f"{report.avg_at_k:.4f}"),
        *((f"pass@{k}", f"{v:.4f}") for k, v in report.pass_at.items()),
        (
            "greedy accuracy",
            "-" if report.greedy_accuracy is None else f"{report.greedy_accuracy:.4f}",
        ),
        ("mean response tokens", f"{report.mean_response_tokens:.2f}"),
        ("entropy (nats/token)", f"{report.entropy:.4f}"),
        ("finished with EOS", f"{report.finished_rate:.4f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def run_eval(config: RunConfig, args: argparse.Namespace) -> int:
    request = _request_from_args(config, args)
    problems = load_problems(request.data, request.fields, request.limit)
    err = Console(stderr=True)
    start_s = time.monotonic()
    with materialize_checkpoint(request.checkpoint, config.model.path, config.model.dtype) as path:
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, disable=args.no_progress) as progress:
            report = evaluate_model_dir(
                config, path, problems, request.verifier, request.settings, request.seed, progress
            )
    report.meta = {
        "checkpoint": str(request.checkpoint),
        "data": str(request.data),
        "backend": config.generator.backend.type,
        "verifier": request.verifier,
        "prompt_field": request.fields.prompt_field,
        "answer_field": request.fields.answer_field,
        "seed": request.seed,
        "elapsed_s": round(time.monotonic() - start_s, 2),
    }
    Console().print(_table(report))
    document = json.dumps(report.to_json(), indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document + "\n")
        err.print(f"wrote {args.out}")
    else:
        sys.stdout.write(document + "\n")
    return 0

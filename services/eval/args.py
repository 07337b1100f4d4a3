"""The options of `lpreg eval` (imported by the CLI's parser: no torch here)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_eval_args"]


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of `lpreg eval` (besides CONFIG and --set)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="Hugging Face model dir (e.g. runs/tiny/final_model) or learner checkpoint "
        "(a step_* dir, a checkpoints root, or a run dir)",
    )
    p.add_argument("--data", required=True, help="JSON-lines or Parquet file of problems")
    p.add_argument("--prompt-field", help="dotted path of the prompt (default: task.prompt_field)")
    p.add_argument("--answer-field", help="dotted path of the answer (default: task.answer_field)")
    p.add_argument("--prompt-template", help="format string around {prompt} (default: task's)")
    p.add_argument("--verifier", choices=["exact_match", "math"], help="default: task.verifier")
    p.add_argument(
        "--num-samples", type=int, help="k samples per problem (default: sampling.num_samples)"
    )
    p.add_argument("--temperature", type=float, help="default: sampling.temperature")
    p.add_argument("--max-new-tokens", type=int, help="default: sampling.max_new_tokens")
    p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--seed", type=int, help="sampling seed (default: generator.seed)")
    p.add_argument("--out", type=Path, help="write the JSON report here (else print it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

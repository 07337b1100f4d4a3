"""Learner step throughput vs a bare forward+backward of the same model; prints one JSON object.

Both sides run on CPU in this process, on the same model and the same token sequences:

  step   services.learner.trainer.Trainer.step with the tiny task's Lp-Reg loss, one update per
         step: one forward+backward per micro-batch through the fused token statistics (the
         step-start log-probs, entropy and min-p proxy come from that pass), plus a pass over
         the sequences that hold regularised tokens when Lp-Reg selects any, gradient clipping
         and the AdamW update.
  bare   forward+backward of transformers' own causal-LM loss (full logits, cross-entropy) over
         the same sequences and micro-batches: the least a training step can cost.

tokens_per_s counts every token of the batch (prompt + completion) per step;
ratio = step tokens/s over bare tokens/s (medians of --repeats after one warm-up of each). The
step computes its statistics over completion tokens only, the bare loss over every token, so a
ratio above 1 is possible. ratio_vs_forward_plus_bare compares the step with the two-pass floor
(a no-grad forward of the same sequences, timed, plus the bare forward+backward) that a step of
several updates pays.

    .venv/bin/python benchmarks/bench_learner.py [--repeats 3] [--threads 1]
    .venv/bin/python benchmarks/bench_learner.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.config import LearnerConfig  # noqa: E402
from lpreg_core.wire.lpreg.v1 import rollout_pb2  # noqa: E402
from services.learner.trainer import StepBatch, Trainer, build_batch  # noqa: E402

TINY_CONFIG = REPO_ROOT / "examples" / "tiny" / "config.yaml"

# A small Qwen2 a CPU steps through in seconds; its head (V = 32,000) is a realistic share of
# the work, as a real model's is.
DEFAULT_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
SMOKE_SHAPE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def random_groups(
    vocab: int, num_sequences: int, seq_len: int, group_size: int, seed: int
) -> list[rollout_pb2.RolloutGroup]:
    """Groups of random tokens: a quarter of each sequence is prompt, the rest completion;
    behaviour log-probs near the policy's, rewards alternating so every advantage is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = seq_len // 4
    groups = []
    for g in range(num_sequences // group_size):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        group = rollout_pb2.RolloutGroup(task_id=f"r{g}", prompt_token_ids=prompt)
        for i in range(group_size):
            toks = torch.randint(3, vocab, (seq_len - prompt_len,), generator=gen).tolist()
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=toks,
                    logprobs=[-float(torch.log(torch.tensor(float(vocab))))] * len(toks),
                    versions=[0] * len(toks),
                    reward=float(i % 2),
                )
            )
        groups.append(group)
    return groups


def sequences_tensor(batch: StepBatch) -> torch.Tensor:
    return torch.tensor(batch.sequences)


def bare_forward_backward(model: torch.nn.Module, seqs: torch.Tensor, micro: int) -> None:
    """transformers' causal-LM loss, forward and backward, micro-batch by micro-batch."""
    num = seqs.shape[0]
    for start in range(0, num, micro):
        ids = seqs[start : start + micro]
        out = model(input_ids=ids, labels=ids)
        (out.loss * (ids.shape[0] / num)).backward()
    model.zero_grad(set_to_none=True)


def no_grad_forward(model: torch.nn.Module, seqs: torch.Tensor, micro: int) -> None:
    with torch.no_grad():
        for start in range(0, seqs.shape[0], micro):
            model(input_ids=seqs[start : start + micro])


def median_s(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, optimiser state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run(
    shape: dict[str, Any], num_sequences: int, seq_len: int, micro: int, repeats: int
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    config = LearnerConfig.model_validate(
        {
            "loss": tiny["learner"]["loss"],
            "micro_batch_sequences": micro,
            "compute_dtype": "float32",
            "optimizer": {"lr": 1e-6},
        }
    )
    trainer = Trainer(model, config, device=torch.device("cpu"))
    groups = random_groups(shape["vocab_size"], num_sequences, seq_len, min(8, num_sequences), 0)
    batch = build_batch(groups, "std")
    seqs = sequences_tensor(batch)
    num_tokens = int(seqs.numel())
    # Alternating sides, so a change in the machine's load falls on both.
    step_s: list[float] = []
    bare_s: list[float] = []
    fwd_s: list[float] = []
    trainer.step(batch)
    bare_forward_backward(model, seqs, micro)
    no_grad_forward(model, seqs, micro)
    for _ in range(repeats):
        for fn, out in (
            (lambda: trainer.step(batch), step_s),
            (lambda: bare_forward_backward(model, seqs, micro), bare_s),
            (lambda: no_grad_forward(model, seqs, micro), fwd_s),
        ):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    step = statistics.median(step_s)
    bare = statistics.median(bare_s)
    fwd = statistics.median(fwd_s)
    return {
        "model": "Qwen2ForCausalLM, random weights",
        "shape": shape,
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_sequences": num_sequences,
        "sequence_len": seq_len,
        "num_tokens": num_tokens,
        "num_completion_tokens": batch.num_tokens,
        "micro_batch_sequences": micro,
        "loss_type": config.loss.type,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "step_s": step,
        "bare_forward_backward_s": bare,
        "no_grad_forward_s": fwd,
        "tokens_per_s": num_tokens / step,
        "bare_tokens_per_s": num_tokens / bare,
        "ratio": bare / step,
        "ratio_vs_forward_plus_bare": (bare + fwd) / step,
        "step_s_all": step_s,
        "bare_forward_backward_s_all": bare_s,
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer width-64 model, 4 x 32")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = DEFAULT_SHAPE
    if args.smoke:
        shape, args.sequences, args.seq_len, args.micro, args.repeats = SMOKE_SHAPE, 4, 32, 4, 1
    result = run(shape, args.sequences, args.seq_len, args.micro, args.repeats)
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

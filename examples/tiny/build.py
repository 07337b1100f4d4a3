"""Build the tiny demo policy: tokenizer, Qwen2 model, supervised warm start, evaluation.

The warm start is stopped early on purpose: sampled at temperature 1 the model should be right
on a fraction of eval problems and disagree with itself within a group, so GRPO has signal.

    .venv/bin/python examples/tiny/build.py                  # writes examples/tiny/model/
    .venv/bin/python examples/tiny/build.py --steps 1200 --out /tmp/tiny --eval-every 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.rewards import ExactMatchVerifier  # noqa: E402
from lpreg_core.tasks.arithmetic import (  # noqa: E402
    DEFAULT_MAX_NEW_TOKENS,
    Problem,
    make_problems,
    problem_at,
)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Everything the task writes, plus space and newline so free text round-trips.
CHARACTERS = "0123456789+-*= \n"
# Qwen2's pre-tokenizer regex: it splits digits one by one; with no merges the byte-level BPE
# below is a character tokenizer that transformers' Qwen2Tokenizer, tokenizers and vLLM all load
# identically (transformers v5 rebuilds any qwen2 checkpoint's tokenizer with this pipeline).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_POSITION_EMBEDDINGS = 64

DEFAULT_OUT = Path(__file__).resolve().parent / "model"
DEFAULT_SEED = 0
DEFAULT_STEPS = 900
# One thread: floating-point reduction order, hence the early-stopped model, depends on it.
DEFAULT_THREADS = 1
NUM_EVAL_PROBLEMS = 200
NUM_EVAL_SAMPLES = 8


@dataclass(frozen=True)
class TrainConfig:
    """Supervised warm-start settings.

    The learning rate is deliberately high and constant: the model ends in a flat region that
    tolerates the RL learner's steps. Stopped at the same accuracy, a warm start trained at 1e-3
    lost reward under RL at lr 2e-4; this one gains reward at 1e-4 to 3e-4.
    """

    steps: int
    seed: int
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01


@dataclass(frozen=True)
class EvalReport:
    greedy_accuracy: float
    pass_at_1: float
    pass_at_k: float
    k: int
    temperature: float
    mean_completion_tokens: float
    eos_rate: float
    mean_distinct_per_group: float
    mixed_group_fraction: float
    num_problems: int


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: a byte-level BPE with no merges; ``<bos>`` is prepended."""
    byte_to_unicode = bytes_to_unicode()
    characters = [byte_to_unicode[ord(c)] for c in CHARACTERS]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that older and newer loaders agree on."""
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in special.items() if v is not None}, indent=2) + "\n"
    )


def build_model(tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config).float()


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Full-distribution sampling at T=1, as the behaviour policy of the demo samples."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, problems: list[Problem]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` ids, attention mask, and labels on the answer."""
    rows: list[tuple[list[int], int]] = []
    for problem in problems:
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        answer_ids = tokenizer(problem.answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (ids, num_prompt) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, num_prompt : len(ids)] = torch.tensor(ids[num_prompt:])
    return input_ids, attention_mask, labels


def train(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    eval_every: int = 0,
    eval_problems: list[Problem] | None = None,
) -> None:
    """Supervised warm start on the train stream, answer tokens only, constant lr after warmup
    (so that stopping at step N gives the same model whatever the total)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps)
    )
    model.train()
    start_s = time.monotonic()
    for step in range(config.steps):
        problems = [
            problem_at(step * config.batch_size + i, config.seed, "train")
            for i in range(config.batch_size)
        ]
        input_ids, attention_mask, labels = encode_batch(tokenizer, problems)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        done = step + 1
        if done % 50 == 0 or done == config.steps:
            elapsed_s = time.monotonic() - start_s
            print(f"step {done:5d}  loss {loss.item():.4f}  {elapsed_s:6.1f}s", flush=True)
        if eval_every and eval_problems and done % eval_every == 0 and done != config.steps:
            report = evaluate(model, tokenizer, eval_problems, seed=config.seed)
            print(f"  eval@{done}: {json.dumps(asdict(report))}", flush=True)
            model.train()


@torch.no_grad()
def sample(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[list[list[int]]]:
    """``num_samples`` completions (token ids, ``<eos>`` included when emitted) per prompt.

    Prompts of equal token length are batched together, so no padding is ever fed to the model.
    Temperature 0 is greedy decoding.
    """
    model.eval()
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    completions: list[list[list[int]]] = [[] for _ in prompts]
    for indices in by_length.values():
        batch = torch.tensor([encoded[i] for i in indices]).repeat_interleave(num_samples, dim=0)
        finished = torch.zeros(batch.shape[0], dtype=torch.bool)
        generated = []
        past = None
        inputs = batch
        for _ in range(max_new_tokens):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(finished, tokenizer.pad_token_id, token)
            generated.append(token)
            finished |= token == tokenizer.eos_token_id
            if bool(finished.all()):
                break
            inputs = token.unsqueeze(1)
        tokens = torch.stack(generated, dim=1).tolist()
        for row, ids in enumerate(tokens):
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            completions[indices[row // num_samples]].append(ids)
    return completions


def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    seed: int,
    k: int = NUM_EVAL_SAMPLES,
    temperature: float = 1.0,
) -> EvalReport:
    """Greedy accuracy, and pass@1 / pass@k, length and group diversity at ``temperature``."""
    verifier = ExactMatchVerifier()
    prompts = [p.prompt for p in problems]
    greedy = sample(model, tokenizer, prompts, num_samples=1, temperature=0.0)
    greedy_correct = [
        verifier.score(tokenizer.decode(group[0], skip_special_tokens=True), p.answer)
        for group, p in zip(greedy, problems, strict=True)
    ]
    torch.manual_seed(seed + 1)
    groups = sample(model, tokenizer, prompts, num_samples=k, temperature=temperature)
    rewards, lengths, ended, distinct = [], [], [], []
    for group, problem in zip(groups, problems, strict=True):
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in group]
        rewards.append([verifier.score(text, problem.answer) for text in texts])
        lengths.extend(len(ids) for ids in group)
        ended.extend(tokenizer.eos_token_id in ids for ids in group)
        distinct.append(len({tuple(ids) for ids in group}))
    num = len(problems)
    return EvalReport(
        greedy_accuracy=round(sum(greedy_correct) / num, 4),
        pass_at_1=round(sum(sum(r) for r in rewards) / (num * k), 4),
        pass_at_k=round(sum(max(r) for r in rewards) / num, 4),
        k=k,
        temperature=temperature,
        mean_completion_tokens=round(sum(lengths) / len(lengths), 3),
        eos_rate=round(sum(ended) / len(ended), 4),
        mean_distinct_per_group=round(sum(distinct) / num, 3),
        mixed_group_fraction=round(sum(0 < sum(r) < k for r in rewards) / num, 4),
        num_problems=num,
    )


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write to a sibling directory, then swap it in, so readers never see a half-written model."""
    staging = out.with_name(out.name + ".partial")
    retired = out.with_name(out.name + ".old")
    for path in (staging, retired):
        if path.exists():
            shutil.rmtree(path)
    staging.mkdir(parents=True)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)
    for path in staging.iterdir():
        path.chmod(0o644)
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    if retired.exists():
        shutil.rmtree(retired)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="supervised steps; the early stop that sets the warm start's accuracy",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="torch and data seed")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads"
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  parameters {num_params:,}", flush=True)
    eval_problems = make_problems("eval", NUM_EVAL_PROBLEMS, seed=args.seed)
    train(
        model,
        tokenizer,
        TrainConfig(steps=args.steps, seed=args.seed),
        eval_every=args.eval_every,
        eval_problems=eval_problems,
    )
    report = evaluate(model, tokenizer, eval_problems, seed=args.seed)
    save(model, tokenizer, args.out)
    print(f"saved to {args.out}")
    print(
        f"eval on {report.num_problems} problems: greedy {report.greedy_accuracy:.1%}, "
        f"T={report.temperature:g} pass@1 {report.pass_at_1:.1%}, "
        f"pass@{report.k} {report.pass_at_k:.1%}, "
        f"mixed-reward groups {report.mixed_group_fraction:.1%}, "
        f"{report.mean_distinct_per_group:.2f} distinct completions per group of {report.k}, "
        f"mean completion {report.mean_completion_tokens:.2f} tokens (eos rate {report.eos_rate:.1%})"
    )
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()

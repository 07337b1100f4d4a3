"""Build the entropy-study task and policy: data files, a BPE tokenizer, a Qwen2 model, warm start.

Unlike examples/tiny (19 characters), the policy here has a vocabulary of thousands of BPE tokens
trained on the task's own text, and its warm start imitates several valid solution paths per
problem, so sampling at T = 1 meets real branching points and a real low-probability tail.

    .venv/bin/python examples/study/build.py              # writes model/, train.jsonl, eval.jsonl
    .venv/bin/python examples/study/build.py --steps 600 --out /tmp/study --eval-every 200
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from task import (  # noqa: E402
    STYLES,
    WordProblem,
    demonstration,
    draw_style,
    problems,
    style_of,
)

from lpreg_core.rewards import MathVerifier  # noqa: E402

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Qwen2's pre-tokenizer regex: digits one by one (the model then adds digit by digit), words and
# punctuation as BPE merges them.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 128
MAX_NEW_TOKENS = 48

NUM_TRAIN_PROMPTS = 4096
NUM_EVAL_PROMPTS = 512
# Demonstrations of the supervised warm start: a stream of fresh problems (not the RL prompts).
SFT_SEED = 1
TOKENIZER_TEXTS = 20_000

DEFAULT_SEED = 0
DEFAULT_STEPS = 700
DEFAULT_THREADS = 1
BATCH_SIZE = 64
LR = 2e-3
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.01


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task's text; ``<bos>`` is prepended."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
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


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config).float()


def demonstrations(num: int, seed: int) -> list[tuple[WordProblem, str]]:
    rng = random.Random(f"study/sft/{seed}")
    return [(p, demonstration(p, draw_style(rng), rng)) for p in problems("train", num, seed)]


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, rows: list[tuple[WordProblem, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt completion <eos>`` ids, attention mask, completion labels."""
    encoded = []
    for problem, completion in rows:
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, num_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, num_prompt : len(ids)] = torch.tensor(ids[num_prompt:])
    return input_ids, attention, labels


def train(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    seed: int,
    eval_every: int,
    eval_set: list[WordProblem],
) -> None:
    """Supervised warm start on completion tokens, constant lr after warm-up (so stopping at step
    N gives the same model whatever the total)."""
    data = demonstrations(steps * BATCH_SIZE, SFT_SEED + seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS)
    )
    start_s = time.monotonic()
    for step in range(steps):
        model.train()
        batch = data[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
        input_ids, attention, labels = encode_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        done = step + 1
        if done % 50 == 0 or done == steps:
            print(f"step {done:5d}  loss {loss.item():.4f}  {time.monotonic() - start_s:6.1f}s")
        if eval_every and done % eval_every == 0 and done != steps:
            print(f"  eval@{done}: {json.dumps(evaluate(model, tokenizer, eval_set, seed))}")


@torch.no_grad()
def sample_stats(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    num_samples: int,
    kappa: float = 0.02,
) -> tuple[list[list[str]], dict[str, float]]:
    """Completions at T = 1 plus token statistics: entropy, and the min-p tail mass 1 - Z at the
    sampled tokens (Z = probability mass of the tokens with p >= kappa * max p)."""
    model.eval()
    texts: list[list[str]] = []
    entropies: list[float] = []
    tails: list[float] = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]] * num_samples)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=MAX_NEW_TOKENS,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion = out.sequences[:, ids.shape[1] :]
        for t, scores in enumerate(out.scores):
            alive = (completion[:, :t] != tokenizer.eos_token_id).all(dim=1)
            probs = torch.softmax(scores[alive].float(), dim=-1)
            entropies.extend((-(probs * probs.clamp_min(1e-30).log()).sum(-1)).tolist())
            keep = probs >= kappa * probs.amax(-1, keepdim=True)
            tails.extend((1.0 - (probs * keep).sum(-1)).tolist())
        texts.append([tokenizer.decode(row, skip_special_tokens=True) for row in completion])
    return texts, {
        "token_entropy": sum(entropies) / len(entropies),
        "tail_mass_mean": sum(tails) / len(tails),
    }


def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    eval_set: list[WordProblem],
    seed: int,
    num_samples: int = 8,
) -> dict[str, float]:
    verifier = MathVerifier()
    torch.manual_seed(seed + 1)
    groups, stats = sample_stats(model, tokenizer, [p.prompt for p in eval_set], num_samples)
    rewards = [
        [verifier.score(t, p.answer) for t in texts]
        for texts, p in zip(groups, eval_set, strict=True)
    ]
    styles = Counter(style_of(t) for texts in groups for t in texts)
    num = len(eval_set)
    report = {
        "pass_at_1": sum(map(sum, rewards)) / (num * num_samples),
        f"pass_at_{num_samples}": sum(max(r) for r in rewards) / num,
        "mixed_group_fraction": sum(0 < sum(r) < num_samples for r in rewards) / num,
        **stats,
    }
    for style in (*STYLES, "other"):
        report[f"style_{style}"] = styles[style] / (num * num_samples)
    return {k: round(v, 4) for k, v in report.items()}


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def write_jsonl(path: Path, rows: list[WordProblem]) -> None:
    lines = [json.dumps({"prompt": p.prompt, "answer": p.answer}) for p in rows]
    path.write_text("\n".join(lines) + "\n")


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write to a sibling directory, then swap it in."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="supervised steps")
    parser.add_argument("--out", type=Path, default=HERE / "model", help="model directory")
    parser.add_argument("--data-dir", type=Path, default=HERE, help="where the JSONL files go")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="torch and data seed")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps")
    parser.add_argument("--eval-problems", type=int, default=128, help="problems per evaluation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.data_dir / "train.jsonl", problems("train", NUM_TRAIN_PROMPTS, args.seed))
    eval_set = problems("eval", NUM_EVAL_PROMPTS, args.seed)
    write_jsonl(args.data_dir / "eval.jsonl", eval_set)
    texts = [p.prompt + c for p, c in demonstrations(TOKENIZER_TEXTS, SFT_SEED + args.seed)]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  parameters {num_params:,}", flush=True)
    probe = eval_set[: args.eval_problems]
    train(model, tokenizer, args.steps, args.seed, args.eval_every, probe)
    save(model, tokenizer, args.out)
    report = evaluate(model, tokenizer, probe, args.seed)
    print(f"saved to {args.out}")
    print(json.dumps({"vocab_size": len(tokenizer), "parameters": num_params, **report}))


if __name__ == "__main__":
    main()

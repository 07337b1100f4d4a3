"""`lpreg generate MODEL_DIR PROMPT`: a quick look at what a model (e.g. a run's final_model)
answers, loaded the way any Hugging Face user would load it."""

from __future__ import annotations

import argparse
import sys

from services.common.startup import model_dir_problems


def run_generate(args: argparse.Namespace) -> int:
    problems = model_dir_problems(args.model, setting="MODEL_DIR")
    if problems:
        print("lpreg generate: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    inputs = tokenizer([args.prompt] * args.num_samples, return_tensors="pt")
    greedy = args.temperature <= 0
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else args.temperature,
            top_p=None if greedy else 1.0,
            top_k=None if greedy else 0,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    for i, text in enumerate(tokenizer.batch_decode(new, skip_special_tokens=True)):
        print(f"[{i}] {args.prompt}{text}")
    return 0

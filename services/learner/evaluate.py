"""Greedy held-out accuracy of the learner's current policy (a progress signal for small runs)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from lpreg_core.config import RunConfig
from lpreg_core.rewards import make_verifier
from lpreg_core.tasks.arithmetic import Problem

_TOKENIZERS: dict[str, object] = {}


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, config: RunConfig, problems: list[Problem]) -> float:
    if not problems:
        return 0.0
    path = config.model.path
    tok = _TOKENIZERS.setdefault(path, AutoTokenizer.from_pretrained(path))
    verifier = make_verifier(config.task.verifier)
    was_training = model.training
    model.eval()
    correct = 0.0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # type: ignore[attr-defined]
    for start in range(0, len(problems), 64):
        chunk = problems[start : start + 64]
        enc = [tok(p.prompt)["input_ids"] for p in chunk]  # type: ignore[operator]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            attn[i, width - len(e) :] = 1
        device = next(model.parameters()).device
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=False,
            max_new_tokens=config.sampling.max_new_tokens,
            pad_token_id=pad,
        )
        for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
            correct += verifier.score(tok.decode(row, skip_special_tokens=True), p.answer)  # type: ignore[attr-defined]
    model.train(was_training)
    return round(correct / len(problems), 4)

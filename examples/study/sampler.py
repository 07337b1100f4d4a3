"""The entropy study's synchronous sampler: full distribution at T = 1, KV-cached, with the
per-token statistics the study reports (entropy, min-p kept mass Z, whether the token is kept).

It samples like services/generator/backends/hf.py (left padding, one multinomial draw per row
and step) and additionally records what the behaviour policy's distribution looked like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KAPPA = 0.02
"""min-p threshold of the tail-mass figures (the paper's, and every Lp-Reg arm's)."""


@dataclass
class Sampled:
    """One completion with per-token statistics of the policy that sampled it."""

    token_ids: list[int]
    logprobs: list[float]
    entropy: list[float]
    kept_mass: list[float]  # Z: probability mass of tokens with p >= kappa * max p (T = 1)
    kept: list[bool]  # whether the sampled token itself passes the min-p filter
    finished: bool


@torch.no_grad()
def sample_groups(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
) -> list[list[Sampled]]:
    """num_samples completions per prompt at T = 1 from the full distribution, KV-cached,
    left-padded (as services/generator/backends/hf.py does)."""
    rows = [p for p in prompts for _ in range(num_samples)]
    batch, width = len(rows), max(len(p) for p in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(rows):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    out = [Sampled([], [], [], [], [], False) for _ in rows]
    done = torch.zeros(batch, dtype=torch.bool)
    past = None
    step_ids = input_ids
    for _ in range(max_new_tokens):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        result = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = result.past_key_values
        logp = torch.log_softmax(result.logits[:, -1, :].float(), dim=-1)
        probs = logp.exp()
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token_logp = logp.gather(-1, token[:, None]).squeeze(-1)
        entropy = -(probs * logp).sum(-1)
        keep = probs >= KAPPA * probs.amax(-1, keepdim=True)
        kept_mass = (probs * keep).sum(-1)
        token_kept = keep.gather(-1, token[:, None]).squeeze(-1)
        for row in range(batch):
            if done[row]:
                continue
            s = out[row]
            tok = int(token[row])
            s.token_ids.append(tok)
            s.logprobs.append(float(token_logp[row]))
            s.entropy.append(float(entropy[row]))
            s.kept_mass.append(float(kept_mass[row]))
            s.kept.append(bool(token_kept[row]))
            if tok == eos_id:
                s.finished = True
                done[row] = True
        if bool(done.all()):
            break
        step_ids = torch.where(done, torch.full_like(token, pad_id), token)[:, None]
        attention = torch.cat([attention, (~done).long()[:, None]], dim=1)
    return [out[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

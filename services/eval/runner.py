"""Evaluate a policy through a generator backend: greedy accuracy, avg@k, pass@k, length, entropy.

Sampling goes through the same ``GeneratorBackend`` the generators use (``make_backend``), so an
evaluation measures exactly the sampler that trains: hf or vllm, full distribution at the given
temperature, raw log-probs per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lpreg_core.rewards import Verifier
from services.eval.data import EvalProblem
from services.eval.metrics import avg_at_k, mean_pass_at_k
from services.generator.backends import GeneratorBackend, SampledCompletion, SampleRequest

__all__ = ["GREEDY_TEMPERATURE", "EvalReport", "EvalSettings", "evaluate", "pass_ks"]

GREEDY_TEMPERATURE = 1e-6
"""Temperature of the greedy pass. The backends divide logits by T (0 would give NaN in the hf
backend); at 1e-6 softmax is one-hot in float32 unless the top two logits tie to ~1e-5, and vLLM
treats any T below 1e-5 as greedy decoding."""


@dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = True
    # Prompts handed to the backend per generate() call (one progress update each).
    prompts_per_call: int = 16

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (greedy is separate), got {self.temperature}"
            )
        if self.max_new_tokens < 1 or self.prompts_per_call < 1:
            raise ValueError("max_new_tokens and prompts_per_call must be >= 1")


@dataclass
class EvalReport:
    """Figures of one evaluation (``to_json`` gives the JSON document ``lpreg eval`` writes).

    avg_at_k: mean correctness over the k samples per problem (k = num_samples).
    pass_at: unbiased pass@k for k in pass_ks (1 and powers of two up to num_samples).
    entropy: mean of -log pi(o_t) over sampled tokens at the sampling temperature, an unbiased
        estimate of the per-token entropy of the sampling policy (token-weighted).
    mean_response_tokens: completion length in tokens, over all samples (EOS included if emitted).
    finished_rate: share of samples that ended with EOS rather than at max_new_tokens.
    """

    num_problems: int
    num_samples: int
    temperature: float
    max_new_tokens: int
    avg_at_k: float
    pass_at: dict[str, float]
    mean_response_tokens: float
    entropy: float
    finished_rate: float
    greedy_accuracy: float | None = None
    greedy_mean_response_tokens: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pass_ks(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to num_samples, plus num_samples itself."""
    ks = [1]
    while ks[-1] * 2 <= num_samples:
        ks.append(ks[-1] * 2)
    if ks[-1] != num_samples:
        ks.append(num_samples)
    return ks


def _sample(
    backend: GeneratorBackend,
    prompt_ids: Sequence[list[int]],
    num_samples: int,
    temperature: float,
    settings: EvalSettings,
    on_progress: Callable[[int], None],
) -> list[list[SampledCompletion]]:
    out: list[list[SampledCompletion]] = []
    step = settings.prompts_per_call
    for start in range(0, len(prompt_ids), step):
        chunk = prompt_ids[start : start + step]
        requests = [
            SampleRequest(list(ids), num_samples, temperature, settings.max_new_tokens)
            for ids in chunk
        ]
        out.extend(backend.generate(requests))
        on_progress(len(chunk))
    return out


def _scores(
    backend: GeneratorBackend,
    verifier: Verifier,
    problems: Sequence[EvalProblem],
    groups: Sequence[Sequence[SampledCompletion]],
) -> list[list[float]]:
    return [
        [verifier.score(backend.decode(c.token_ids), p.answer) for c in group]
        for p, group in zip(problems, groups, strict=True)
    ]


def evaluate(
    backend: GeneratorBackend,
    problems: Sequence[EvalProblem],
    verifier: Verifier,
    settings: EvalSettings,
    on_progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Sample ``settings.num_samples`` completions per problem (and one greedy one) and score them.

    ``on_progress(n)`` is called after every n prompts of either pass.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    progress = on_progress or (lambda _n: None)
    prompt_ids = [backend.tokenize(p.prompt) for p in problems]
    groups = _sample(
        backend, prompt_ids, settings.num_samples, settings.temperature, settings, progress
    )
    correct = _scores(backend, verifier, problems, groups)
    samples = [c for group in groups for c in group]
    num_tokens = sum(len(c.token_ids) for c in samples)
    neg_log_prob = -sum(sum(c.logprobs) for c in samples)
    report = EvalReport(
        num_problems=len(problems),
        num_samples=settings.num_samples,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        avg_at_k=avg_at_k(correct),
        pass_at={str(k): mean_pass_at_k(correct, k) for k in pass_ks(settings.num_samples)},
        mean_response_tokens=num_tokens / len(samples),
        entropy=neg_log_prob / num_tokens if num_tokens else math.nan,
        finished_rate=sum(c.finished for c in samples) / len(samples),
    )
    if settings.greedy:
        greedy = _sample(backend, prompt_ids, 1, GREEDY_TEMPERATURE, settings, progress)
        report.greedy_accuracy = avg_at_k(_scores(backend, verifier, problems, greedy))
        report.greedy_mean_response_tokens = sum(len(g[0].token_ids) for g in greedy) / len(greedy)
    return report

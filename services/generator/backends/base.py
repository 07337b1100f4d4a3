"""The generator backend interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from lpreg_core.weights import WeightManifest
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup


class WeightsUnusable(RuntimeError):
    """A weight load stopped half way: the backend samples nothing until a complete publish."""


@dataclass(frozen=True)
class SampleRequest:
    """Sample `num_samples` completions of one tokenized prompt."""

    prompt_token_ids: list[int]
    num_samples: int
    temperature: float
    max_new_tokens: int


@dataclass
class SampledCompletion:
    token_ids: list[int] = field(default_factory=list)
    # Full-vocabulary log-probability of each sampled token at the sampling temperature.
    logprobs: list[float] = field(default_factory=list)
    # Policy version of the weights that sampled each token.
    versions: list[int] = field(default_factory=list)
    finished: bool = False  # True when the model emitted EOS (else the length limit was hit)


class GeneratorBackend(Protocol):
    """What a generator needs from a sampling engine.

    Sampling is always top_p = 1 with no top-k / min-p: the behaviour policy is the full
    distribution at the given temperature, and the returned log-probs are its raw values.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def version(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_workers(self) -> int:
        """Ranks this backend contributes to the weight broadcast group."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(self, requests: list[SampleRequest]) -> list[list[SampledCompletion]]: ...

    def join_group(self, join: JoinGroup) -> None:
        """Join the broadcast group of a new epoch (every worker of this backend takes a rank
        from join.rank_offset on)."""
        ...

    def update_weights(self, manifest: WeightManifest, timeout_s: float) -> str:
        """Receive the broadcast described by `manifest`, verify it, and swap the weights in
        place (pausing new sampling steps, keeping in-flight sequences). Tokens sampled
        afterwards carry manifest.version. Returns the checksum of what was loaded."""
        ...

    def leave_group(self) -> None: ...

    def close(self) -> None: ...

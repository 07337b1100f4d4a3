"""Typed configs of the policy losses, and what each variant needs from the token statistics.

Torch-free on purpose: `lpreg_core.config` (and with it the CLI, config validation and every
process that only reads a config) imports this module without loading torch. The math lives in
`lpreg_core.loss`, which re-exports every name here.

Each variant declares what it needs, so that callers never branch on the variant's type:

    proxy_filter       the min-p proxy's noise filter (kappa, threshold_mode), or None when the
                       loss needs no proxy log-probs (the statistics then skip the kept-set pass)
    needs_entropy_grad whether the loss differentiates the per-token entropy
    step_ranking       the candidate fractions (rho_neg, rho_pos) when Lp-Reg's bottom-k ranking
                       runs over the whole optimiser step; None when there is no ranking or it runs
                       per micro-batch inside policy_loss
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

__all__ = [
    "ClipHigherConfig",
    "EntropyBonusConfig",
    "GRPOConfig",
    "LossConfig",
    "LpRegConfig",
    "ProxyFilter",
    "StepRanking",
    "ThresholdMode",
    "default_tag",
]

ThresholdMode = Literal["minp", "fixed"]


@dataclass(frozen=True)
class ProxyFilter:
    """The noise filter of Lp-Reg's proxy (docs/algorithm.md section 1), applied at temperature 1.

    "minp": keep v iff p_old(v) >= kappa * max_u p_old(u); "fixed": keep v iff p_old(v) >= kappa.
    """

    kappa: float
    threshold_mode: ThresholdMode = "minp"

    def __post_init__(self) -> None:
        if self.threshold_mode not in ("minp", "fixed"):
            raise ValueError(
                f"threshold_mode must be 'minp' or 'fixed', got {self.threshold_mode!r}"
            )


@dataclass(frozen=True)
class StepRanking:
    """Lp-Reg's candidate fractions, for a bottom-k ranking over a whole optimiser step."""

    rho_neg: float
    rho_pos: float


_LOSS_AGG_DESCRIPTION = (
    "How per-token losses become a scalar: 'token-mean' divides the sum over valid tokens by the "
    "number of valid tokens in the optimiser step; 'seq-mean-token-mean' averages each sequence "
    "over its valid tokens and then averages over sequences."
)
_TEMPERATURE_DESCRIPTION = (
    "Sampling temperature T: log-probs are log softmax(logits / T). Must equal the generators' "
    "temperature (1.0 in every released Lp-Reg run)."
)
_CLIP_LOW_DESCRIPTION = "PPO clip epsilon below 1: the ratio is clipped at 1 - clip_low."
_CLIP_HIGH_DESCRIPTION = "PPO clip epsilon above 1: the ratio is clipped at 1 + clip_high."


class _LossVariant(BaseModel):
    """Base of every loss variant: by default no proxy, no entropy gradient, no step ranking."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @property
    def proxy_filter(self) -> ProxyFilter | None:
        """The proxy's noise filter, or None when the loss needs no proxy log-probs."""
        return None

    @property
    def needs_proxy(self) -> bool:
        return self.proxy_filter is not None

    @property
    def needs_entropy_grad(self) -> bool:
        """Whether the loss differentiates the per-token entropy."""
        return False

    @property
    def step_ranking(self) -> StepRanking | None:
        """Candidate fractions when candidates are ranked over the whole optimiser step."""
        return None


class LpRegConfig(_LossVariant):
    """Lp-Reg: PPO-clip surrogate plus a k3 pull towards the min-p proxy on selected tokens."""

    type: Literal["lp_reg"] = Field("lp_reg", description="Loss variant discriminator.")
    kappa: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Noise threshold of the proxy. 'minp': keep token v iff p_old(v) >= kappa * "
        "max_u p_old(u) (0.02 in the paper); 'fixed': keep v iff p_old(v) >= kappa (absolute tau). "
        "p_old is softmax of the old logits at temperature 1.",
    )
    threshold_mode: ThresholdMode = Field(
        "minp", description="Whether kappa is relative to the top probability ('minp') or absolute."
    )
    rho_neg: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Fraction of valid negative-advantage tokens (lowest current log-prob first) "
        "that are candidates for regularisation; k = int(n * rho_neg) and nothing happens unless "
        "k > 1. 0.01 (Qwen3-14B) or 0.005 (Qwen2.5-32B) in the paper.",
    )
    rho_pos: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Same as rho_neg for positive-advantage tokens (0, off, in every released run).",
    )
    beta: float = Field(1.0, ge=0.0, description="Weight of the k3 term on regularised tokens.")
    clip_low: float = Field(1.0, ge=0.0, le=1.0, description=_CLIP_LOW_DESCRIPTION)
    clip_high: float = Field(9.0, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)
    temperature: float = Field(1.0, gt=0.0, description=_TEMPERATURE_DESCRIPTION)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description=_LOSS_AGG_DESCRIPTION
    )
    kl_clamp: float = Field(
        10.0,
        gt=0.0,
        description="k3 is clamped to [-kl_clamp, kl_clamp]; at 10 the pull stops once "
        "pi_proxy / pi_theta > 13.6.",
    )
    ranking: Literal["step", "micro_batch"] = Field(
        "step",
        description="Scope of the bottom-k candidate ranking. 'step': over all tokens of the "
        "optimiser step (independent of how sequences are packed into micro-batches; the learner "
        "computes the mask with select_regularized and hands it to policy_loss). 'micro_batch': "
        "per micro-batch, exactly as the reference implementation does.",
    )

    @property
    def proxy_filter(self) -> ProxyFilter:
        return ProxyFilter(kappa=self.kappa, threshold_mode=self.threshold_mode)

    @property
    def step_ranking(self) -> StepRanking | None:
        if self.ranking != "step":
            return None
        return StepRanking(rho_neg=self.rho_neg, rho_pos=self.rho_pos)


class _ClippedSurrogateConfig(_LossVariant):
    """Fields shared by the PPO-clip baselines."""

    clip_low: float = Field(0.2, ge=0.0, le=1.0, description=_CLIP_LOW_DESCRIPTION)
    clip_high: float = Field(0.2, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)
    temperature: float = Field(1.0, gt=0.0, description=_TEMPERATURE_DESCRIPTION)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description=_LOSS_AGG_DESCRIPTION
    )


class GRPOConfig(_ClippedSurrogateConfig):
    """Plain GRPO: PPO-clip surrogate with symmetric clipping."""

    type: Literal["grpo"] = Field("grpo", description="Loss variant discriminator.")


class ClipHigherConfig(_ClippedSurrogateConfig):
    """DAPO's clip-higher: PPO-clip surrogate with a wider upper clip (0.28)."""

    type: Literal["clip_higher"] = Field("clip_higher", description="Loss variant discriminator.")
    clip_high: float = Field(0.28, ge=0.0, description=_CLIP_HIGH_DESCRIPTION)


class EntropyBonusConfig(_ClippedSurrogateConfig):
    """PPO-clip surrogate minus entropy_coef times the policy entropy at each valid token."""

    type: Literal["entropy_bonus"] = Field(
        "entropy_bonus", description="Loss variant discriminator."
    )
    entropy_coef: float = Field(
        0.001, ge=0.0, description="Weight of the entropy bonus: l_t -= entropy_coef * H_t."
    )

    @property
    def needs_entropy_grad(self) -> bool:
        return True


def default_tag(default: str) -> Discriminator:
    """A `type` discriminator that falls back to `default` when a config omits `type`."""

    def tag(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("type", default))
        return str(getattr(value, "type", default))

    return Discriminator(tag)


LossConfig = Annotated[
    Annotated[LpRegConfig, Tag("lp_reg")]
    | Annotated[GRPOConfig, Tag("grpo")]
    | Annotated[ClipHigherConfig, Tag("clip_higher")]
    | Annotated[EntropyBonusConfig, Tag("entropy_bonus")],
    default_tag("lp_reg"),
]
"""A loss variant, chosen by its `type` (Lp-Reg when omitted)."""

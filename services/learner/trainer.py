"""One optimiser step of Lp-Reg (or a baseline loss) over a batch of rollout groups.

A step runs in two passes over micro-batches:
1. no-grad: log-probs of the step-start (proximal) policy, the Lp-Reg proxy (built from the same
   detached weights, i.e. the step-start policy), and entropy, for every completion token;
   the regularised set is then ranked over the whole step (docs/algorithm.md section 5);
2. with grad: the loss of each micro-batch with the step's token count as denominator, so the
   gradient equals that of one big batch.
Full (tokens x vocab) logits are never materialised: lpreg_core.loss.token_stats_from_hidden
works chunk by chunk from the last hidden states and the LM-head weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lpreg_core.advantages import grpo_advantages
from lpreg_core.config import LearnerConfig
from lpreg_core.loss import (
    ProxyFilter,
    policy_loss,
    select_regularized,
    token_stats_from_hidden,
)
from lpreg_core.wire.lpreg.v1 import rollout_pb2


@dataclass
class StepBatch:
    """A step's completions in a padded (num_sequences, max_completion_len) layout."""

    sequences: list[list[int]]  # prompt + completion token ids
    prompt_lens: list[int]
    completion_lens: list[int]
    tokens: Tensor  # (S, C) completion token ids, 0 on padding
    mask: Tensor  # (S, C) float, 1 for completion tokens
    advantages: Tensor  # (S, C) sequence advantage broadcast over its tokens
    behaviour_log_probs: Tensor  # (S, C)
    versions: Tensor  # (S, C) policy version that sampled each token
    rewards: Tensor  # (S,)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device) -> StepBatch:
        """The batch with its tensors on ``device`` (token lists stay on the host)."""
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            mask=self.mask.to(device),
            advantages=self.advantages.to(device),
            behaviour_log_probs=self.behaviour_log_probs.to(device),
            versions=self.versions.to(device),
            rewards=self.rewards.to(device),
        )


def build_batch(groups: list[rollout_pb2.RolloutGroup], advantage_mode: str) -> StepBatch:
    sequences, prompt_lens, completion_lens = [], [], []
    seq_adv, rewards, comps = [], [], []
    for g in groups:
        r = torch.tensor([[c.reward for c in g.completions]], dtype=torch.float64)
        adv = grpo_advantages(r, mode=advantage_mode)[0]  # type: ignore[arg-type]
        for c, a in zip(g.completions, adv.tolist(), strict=True):
            sequences.append(list(g.prompt_token_ids) + list(c.token_ids))
            prompt_lens.append(len(g.prompt_token_ids))
            completion_lens.append(len(c.token_ids))
            seq_adv.append(a)
            rewards.append(c.reward)
            comps.append(c)
    width = max(completion_lens)
    num = len(sequences)
    tokens = torch.zeros((num, width), dtype=torch.long)
    mask = torch.zeros((num, width))
    behav = torch.zeros((num, width))
    versions = torch.zeros((num, width), dtype=torch.long)
    for i, c in enumerate(comps):
        n = len(c.token_ids)
        tokens[i, :n] = torch.tensor(list(c.token_ids), dtype=torch.long)
        mask[i, :n] = 1.0
        behav[i, :n] = torch.tensor(list(c.logprobs))
        versions[i, :n] = torch.tensor(list(c.versions), dtype=torch.long)
    advantages = torch.tensor(seq_adv, dtype=torch.float32)[:, None] * mask
    return StepBatch(
        sequences,
        prompt_lens,
        completion_lens,
        tokens,
        mask,
        advantages,
        behav,
        versions,
        torch.tensor(rewards),
    )


def _behaviour_weights(
    proximal: Tensor, behaviour: Tensor, mask: Tensor, kind: str, cap: float
) -> tuple[Tensor | None, Tensor]:
    """Per-token importance weights pi_prox / pi_behav (detached) and the updated mask, for the
    resolved ``learner.off_policy_type``."""
    if kind == "none":
        return None, mask
    weights = torch.exp(proximal - behaviour) * mask
    if kind == "tis":
        return weights.clamp(max=cap), mask
    keep = (weights <= cap).to(mask.dtype)
    return weights * keep, mask * keep


def _importance_stats(weights: Tensor | None, valid: Tensor, kept: Tensor) -> dict[str, float]:
    """Importance-weight mean/max over the step's tokens, and the share masked out (decoupled)."""
    if weights is None:
        return {}
    on = valid.bool()
    w = weights[on]
    if not w.numel():
        return {}
    return {
        "iw_mean": float(w.mean()),
        "iw_max": float(w.max()),
        "iw_masked_frac": float(1.0 - kept[on].mean()),
    }


def _step_record(
    batch: StepBatch,
    proximal: Tensor,
    entropy: Tensor,
    mask: Tensor,
    weights: Tensor | None,
    totals: dict[str, float],
    updates: list[dict[str, float]],
    lr: float,
) -> dict[str, float]:
    """A step's figures from its updates' metrics: per-update figures averaged over the updates
    (one update: exactly its own), plus the step-wide statistics."""
    n = len(updates)
    out = dict(totals)
    for k in {k for u in updates for k in u} - {"loss", "grad_norm"}:
        out[k] = sum(u.get(k, 0.0) for u in updates) / n
    out.update(_importance_stats(weights, batch.mask, mask))
    valid = batch.mask.bool()
    gap = (proximal - batch.behaviour_log_probs)[valid]
    return {
        **out,
        "loss": sum(u["loss"] for u in updates) / n,
        "grad_norm": max(u["grad_norm"] for u in updates),
        "lr": lr,
        "num_updates": float(n),
        "entropy": float(entropy[valid].mean()),
        "reward_mean": float(batch.rewards.mean()),
        "num_tokens": float(batch.mask.sum()),
        "num_sequences": float(len(batch.sequences)),
        "completion_len_mean": float(batch.mask.sum(1).mean()),
        # Train/inference mismatch of the behaviour log-probs vs the learner's recompute.
        "logprob_gap_max": float(gap.abs().max()) if gap.numel() else 0.0,
    }


def _split(num: int, parts: int) -> list[slice]:
    """``parts`` contiguous, nearly equal slices of ``range(num)`` (mini-batches of a step)."""
    bounds = [round(i * num / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class Trainer:
    """One optimiser step of a policy held as master weights on ``device``.

    The model's parameters and the optimiser state stay in their own dtype (float32: bf16 master
    weights would silently drop updates smaller than their precision); forward and backward run
    under autocast in ``compute_dtype`` (bfloat16 on CUDA by default), and the LM head's weight is
    cast to it for the fused token statistics, so gradients reach the fp32 master weights in fp32.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: LearnerConfig,
        device: torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)
        master = next(model.parameters()).dtype
        if master in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"the learner's master weights are {master}: load the model in float32 "
                "(model.dtype) and compute in half precision with learner.compute_dtype"
            )
        model.to(self.device)  # type: ignore[arg-type]  # transformers' wrapper types it oddly
        self.model = model
        self.compute_dtype = master if compute_dtype is None else compute_dtype
        self.config = config
        self.loss_config = config.loss
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        warmup = opt.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self._decoder: torch.nn.Module = getattr(model, str(model.base_model_prefix))
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
        self._lm_head = head
        # The weight-touching part of a statistics pass; a sharded trainer replaces it with the
        # same computation run under the FSDP root's forward hooks.
        self.forward_stats: Callable[..., tuple[Tensor, Tensor, Tensor | None]] = (
            self.hidden_token_stats
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == next(self.model.parameters()).dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _micro_batches(self, num: int) -> Iterator[slice]:
        size = self.config.micro_batch_sequences
        for start in range(0, num, size):
            yield slice(start, min(num, start + size))

    def _token_stats(
        self, batch: StepBatch, rows: slice, proxy: ProxyFilter | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-token log-probs, entropy and (with a proxy filter) proxy log-probs of completion
        tokens in `rows`, scattered into the (rows, C) layout."""
        seqs = batch.sequences[rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
        mask = batch.mask[rows].bool().to(self.device)
        # The completion token at absolute position p is predicted by the hidden state at p - 1.
        row_idx, col_idx = mask.nonzero(as_tuple=True)
        prompt_lens = torch.tensor(batch.prompt_lens[rows], device=self.device)
        positions = prompt_lens[row_idx] + col_idx - 1
        log_probs, entropy, proxy_flat = self.forward_stats(
            input_ids.to(self.device),
            attention.to(self.device),
            row_idx,
            positions,
            batch.tokens[rows].to(self.device)[mask],
            proxy,
        )

        def scatter(flat: Tensor) -> Tensor:
            # Statistics leave in float32 at least: the loss is computed from them in full
            # precision whatever the matmuls ran in.
            dtype = torch.promote_types(flat.dtype, torch.float32)
            out = torch.zeros(mask.shape, dtype=dtype, device=self.device)
            return out.index_put((row_idx, col_idx), flat.to(dtype))

        proxy_log_probs = None if proxy_flat is None else scatter(proxy_flat)
        return scatter(log_probs), scatter(entropy), proxy_log_probs

    def hidden_token_stats(
        self,
        input_ids: Tensor,
        attention: Tensor,
        row_idx: Tensor,
        positions: Tensor,
        targets: Tensor,
        proxy: ProxyFilter | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The decoder forward and the fused token statistics of the tokens at (row_idx,
        positions + 1): everything that touches the weights, in one call (a sharded model hooks
        it as a forward method, see services.learner.distributed)."""
        with self._autocast():
            hidden = self._decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        stats = token_stats_from_hidden(
            hidden[row_idx, positions].to(self.compute_dtype),
            self._lm_head.weight.to(self.compute_dtype),
            targets,
            temperature=self.loss_config.temperature,
            proxy=proxy,
            chunk_size=self.config.logit_chunk_size,
        )
        return stats.log_probs, stats.entropy, stats.proxy_log_probs

    def _update(
        self,
        batch: StepBatch,
        mini: slice,
        proximal: Tensor,
        proxy: Tensor | None,
        mask: Tensor,
        reg_mask: Tensor | None,
        weights: Tensor | None,
    ) -> dict[str, float]:
        """One optimiser update on the sequences in ``mini``, micro-batch by micro-batch; the
        loss is normalised by the mini-batch's tokens, so micro-batching changes nothing."""
        lp = self.loss_config
        sub = mask[mini]
        if lp.loss_agg_mode == "seq-mean-token-mean":
            num_tokens = float((sub.sum(-1) > 0).sum())
        else:
            num_tokens = float(sub.sum())
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {"loss": 0.0}
        for micro in self._micro_batches(mini.stop - mini.start):
            rows = slice(mini.start + micro.start, mini.start + micro.stop)
            log_probs, ent, _ = self._token_stats(batch, rows, None)
            loss, metrics = policy_loss(
                log_probs,
                proximal[rows],
                None if proxy is None else proxy[rows],
                batch.advantages[rows],
                mask[rows],
                config=lp,
                num_tokens=num_tokens,
                reg_mask=None if reg_mask is None else reg_mask[rows],
                behaviour_weights=None if weights is None else weights[rows],
                entropy=ent if lp.needs_entropy_grad else None,
            )
            loss.backward()
            totals["loss"] += float(loss.detach())
            # policy_loss normalises by the mini-batch (num_tokens): micro-batch values add up.
            for k, v in metrics.items():
                val = float(v.detach()) if isinstance(v, Tensor) else float(v)
                totals[k] = totals.get(k, 0.0) + val
        totals["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip)
        )
        self.optimizer.step()
        self.scheduler.step()
        return totals

    def _select(
        self, batch: StepBatch, proximal: Tensor, proxy: Tensor | None
    ) -> tuple[Tensor | None, Tensor, Tensor | None, dict[str, float]]:
        """From the step-start statistics of the whole step: the off-policy importance weights
        and mask, and Lp-Reg's regularised set ranked over the whole step."""
        weights, mask = _behaviour_weights(
            proximal,
            batch.behaviour_log_probs,
            batch.mask,
            self.config.off_policy_type,
            self.config.off_policy.cap,
        )
        reg_mask = None
        totals: dict[str, float] = {}
        ranking = self.loss_config.step_ranking
        if ranking is not None:
            assert proxy is not None, "a loss that ranks candidates declares a proxy filter"
            candidates, reg_mask = select_regularized(
                proximal,
                proxy,
                batch.advantages,
                mask,
                rho_neg=ranking.rho_neg,
                rho_pos=ranking.rho_pos,
            )
            totals["num_candidates"] = float(candidates.sum())
        return weights, mask, reg_mask, totals

    def step(self, batch: StepBatch) -> dict[str, float]:
        batch = batch.to(self.device)
        # No dropout in the policy: both passes must see the same function of the weights.
        self.model.eval()
        num = len(batch.sequences)
        with torch.no_grad():
            # The proxy comes from the step-start policy: only this pass computes it, and only
            # for a loss that declares a proxy filter.
            parts = [
                self._token_stats(batch, rows, self.loss_config.proxy_filter)
                for rows in self._micro_batches(num)
            ]
        proximal = torch.cat([p[0] for p in parts])
        entropy = torch.cat([p[1] for p in parts])
        proxies = [p[2] for p in parts if p[2] is not None]
        proxy = torch.cat(proxies) if proxies else None
        weights, mask, reg_mask, totals = self._select(batch, proximal, proxy)
        lr = float(self.scheduler.get_last_lr()[0])
        updates = [
            self._update(batch, mini, proximal, proxy, mask, reg_mask, weights)
            for _epoch in range(self.config.update_epochs)
            for mini in _split(num, self.config.num_mini_batches)
        ]
        return _step_record(batch, proximal, entropy, mask, weights, totals, updates, lr)

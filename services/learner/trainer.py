"""One optimiser step of Lp-Reg (or a baseline loss) over a batch of rollout groups.

A step's loss needs step-wide knowledge: Lp-Reg's regularised set is ranked over the whole step
(docs/algorithm.md section 5), and the token-count denominator counts the tokens the off-policy
correction keeps. Two ways to get it:

- one update per step (updates_per_step = 1, the on-policy default): one pass, forward with grad.
  The parameters do not move during the step, so the proximal (step-start) log-probs are the grad
  pass's own, detached, and the ratio is exactly 1. Each micro-batch's forward records its
  statistics (log-probs, entropy, the proxy) and backward at once runs the loss that needs
  nothing step-wide: importance weights and the decoupled mask are per token, the denominator is
  left at 1 and Lp-Reg's set is left empty. Once every micro-batch is in, the ranking, weights,
  mask and metrics are computed as the two-pass path computes them, from the recorded statistics;
  the gradients are divided by the step's denominator before clipping; and the regularised tokens
  get what the empty set left out. Every term l_t depends on the weights only through log pi(o_t)
  (and H_t), so the gradient is sum_t dL/dlog pi(o_t) * grad log pi(o_t): the missing part is a
  per-token coefficient (the derivative of l_t with minus without t in R, at the recorded values)
  on grad log pi(o_t) of the regularised tokens alone, applied by a forward + backward over the
  sequences that hold them, each cut after its last regularised token (causal attention: nothing
  later reaches it). Exact: losses, metrics and parameters equal the two-pass path's to rounding
  (1e-10 relative in float64; where the model rounds inside, as Qwen2's RMSNorm does to float32
  even in a float64 model, gradients summed in another order agree to that rounding).
  That pass costs a forward + backward of those prefixes, less than the statistics pass it
  replaces while they hold under about a third of the step's tokens (the min-p proxy leaves
  most of the lowest-probability tokens out of R; with none regularised it does not run).
- several updates: a no-grad pass over every micro-batch first (step-start log-probs, the proxy,
  entropy), the selection from it, then each update forward + backward with the mini-batch's
  token count as denominator, so the gradient equals that of one big batch.

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
    TOKEN_MEAN_EPS,
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


@dataclass
class Selection:
    """What the loss of a step's tokens reads besides their current statistics, each (rows, C):
    advantages, the proximal (step-start) log-probs, the proxy's, the mask after off-policy
    masking, Lp-Reg's regularised set when ranked over the step, the importance weights."""

    advantages: Tensor
    proximal: Tensor
    proxy: Tensor | None
    mask: Tensor
    reg_mask: Tensor | None
    weights: Tensor | None

    def __getitem__(self, rows: slice | Tensor) -> Selection:
        """The selection of ``rows`` (a slice or an index tensor)."""
        return Selection(
            self.advantages[rows],
            self.proximal[rows],
            None if self.proxy is None else self.proxy[rows],
            self.mask[rows],
            None if self.reg_mask is None else self.reg_mask[rows],
            None if self.weights is None else self.weights[rows],
        )


def _step_record(
    batch: StepBatch,
    entropy: Tensor,
    sel: Selection,
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
    out.update(_importance_stats(sel.weights, batch.mask, sel.mask))
    valid = batch.mask.bool()
    gap = (sel.proximal - batch.behaviour_log_probs)[valid]
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


def take_rows(batch: StepBatch, rows: list[int]) -> StepBatch:
    """The batch restricted to ``rows`` (same completion width)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.tokens.device)
    return dataclasses.replace(
        batch,
        sequences=[batch.sequences[r] for r in rows],
        prompt_lens=[batch.prompt_lens[r] for r in rows],
        completion_lens=[batch.completion_lens[r] for r in rows],
        tokens=batch.tokens[index],
        mask=batch.mask[index],
        advantages=batch.advantages[index],
        behaviour_log_probs=batch.behaviour_log_probs[index],
        versions=batch.versions[index],
        rewards=batch.rewards[index.to(batch.rewards.device)],
    )


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
        # One-update steps take their statistics from the grad pass (module docstring); False
        # runs the step-start no-grad pass for them too (the two paths give the same step).
        self.single_pass = True

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == next(self.model.parameters()).dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _micro_batches(self, num: int) -> Iterator[slice]:
        size = self.config.micro_batch_sequences
        for start in range(0, num, size):
            yield slice(start, min(num, start + size))

    def _token_stats(
        self,
        batch: StepBatch,
        rows: slice,
        proxy: ProxyFilter | None,
        select: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-token log-probs, entropy and (with a proxy filter) proxy log-probs of completion
        tokens in `rows`, scattered into the (rows, C) layout (zero elsewhere). With ``select``
        ((rows, C) bool), only those tokens, and each sequence only up to its last one."""
        seqs = batch.sequences[rows]
        mask = (batch.mask[rows] if select is None else select).bool().to(self.device)
        # The completion token at absolute position p is predicted by the hidden state at p - 1.
        row_idx, col_idx = mask.nonzero(as_tuple=True)
        prompt_lens = torch.tensor(batch.prompt_lens[rows], device=self.device)
        positions = prompt_lens[row_idx] + col_idx - 1
        if select is not None:
            # Causal attention: later tokens do not reach a selected token's hidden state.
            ends = [1] * len(seqs)
            for r, p in zip(row_idx.tolist(), positions.tolist(), strict=True):
                ends[r] = max(ends[r], p + 1)
            seqs = [s[:end] for s, end in zip(seqs, ends, strict=True)]
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
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

    def _num_tokens(self, mask: Tensor) -> float:
        """The loss denominator of the rows of ``mask``: kept tokens ("token-mean") or sequences
        with a kept token ("seq-mean-token-mean")."""
        if self.loss_config.loss_agg_mode == "seq-mean-token-mean":
            return float((mask.sum(-1) > 0).sum())
        return float(mask.sum())

    def _micro_loss(
        self, log_probs: Tensor, entropy: Tensor, sel: Selection, num_tokens: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """policy_loss of some rows: their own statistics (log_probs, entropy) and selection."""
        lp = self.loss_config
        return policy_loss(
            log_probs,
            sel.proximal,
            sel.proxy,
            sel.advantages,
            sel.mask,
            config=lp,
            num_tokens=num_tokens,
            reg_mask=sel.reg_mask,
            behaviour_weights=sel.weights,
            entropy=entropy if lp.needs_entropy_grad else None,
        )

    def _apply_gradients(self) -> float:
        """Clip the accumulated gradients, step the optimiser and the schedule; the norm."""
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.optimizer.grad_clip
        )
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def _update(self, batch: StepBatch, mini: slice, sel: Selection) -> dict[str, float]:
        """One optimiser update on the sequences in ``mini``, micro-batch by micro-batch; the
        loss is normalised by the mini-batch's tokens, so micro-batching changes nothing."""
        num_tokens = self._num_tokens(sel.mask[mini])
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for micro in self._micro_batches(mini.stop - mini.start):
            rows = slice(mini.start + micro.start, mini.start + micro.stop)
            log_probs, ent, _ = self._token_stats(batch, rows, None)
            loss, metrics = self._micro_loss(log_probs, ent, sel[rows], num_tokens)
            loss.backward()
            _accumulate(sums, loss, metrics)
        totals = {k: float(v) for k, v in sums.items()}
        totals["grad_norm"] = self._apply_gradients()
        return totals

    def _select(
        self, batch: StepBatch, proximal: Tensor, proxy: Tensor | None
    ) -> tuple[Selection, dict[str, float]]:
        """From the step-start statistics of the whole step: the off-policy importance weights
        and mask, and Lp-Reg's regularised set ranked over the whole step."""
        weights, mask = self._importance_weights(batch, slice(None), proximal)
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
        return Selection(batch.advantages, proximal, proxy, mask, reg_mask, weights), totals

    def _importance_weights(
        self, batch: StepBatch, rows: slice, proximal: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """Importance weights and mask of ``rows`` from their proximal log-probs (per token)."""
        return _behaviour_weights(
            proximal,
            batch.behaviour_log_probs[rows],
            batch.mask[rows],
            self.config.off_policy_type,
            self.config.off_policy.cap,
        )

    def step(self, batch: StepBatch) -> dict[str, float]:
        batch = batch.to(self.device)
        # No dropout in the policy: every pass must see the same function of the weights.
        self.model.eval()
        if self.single_pass and self.config.updates_per_step == 1:
            return self._single_pass_step(batch)
        num = len(batch.sequences)
        with torch.no_grad():
            # The proxy comes from the step-start policy: only this pass computes it, and only
            # for a loss that declares a proxy filter.
            parts = [
                self._token_stats(batch, rows, self.loss_config.proxy_filter)
                for rows in self._micro_batches(num)
            ]
        proximal, entropy, proxy = _concat(parts)
        sel, totals = self._select(batch, proximal, proxy)
        lr = float(self.scheduler.get_last_lr()[0])
        updates = [
            self._update(batch, mini, sel)
            for _epoch in range(self.config.update_epochs)
            for mini in _split(num, self.config.num_mini_batches)
        ]
        return _step_record(batch, entropy, sel, totals, updates, lr)

    def _provisional_loss(
        self,
        batch: StepBatch,
        rows: slice,
        log_probs: Tensor,
        entropy: Tensor,
        proxy: Tensor | None,
        num_tokens: float,
    ) -> Tensor:
        """A one-update step's loss of ``rows`` as far as it is known before the other
        micro-batches' forwards: the proximal log-probs are these very ones (detached), the
        weights and mask per token, Lp-Reg's step-wide set empty (a set ranked per micro-batch
        is known here) and ``num_tokens`` the denominator before any decoupled masking."""
        proximal = log_probs.detach()
        weights, mask = self._importance_weights(batch, rows, proximal)
        no_reg = None
        if self.loss_config.step_ranking is not None:
            no_reg = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        sel = Selection(batch.advantages[rows], proximal, proxy, mask, no_reg, weights)
        return self._micro_loss(log_probs, entropy, sel, num_tokens)[0]

    def _recorded_metrics(
        self, micro_batches: Iterator[slice], entropy: Tensor, sel: Selection, num_tokens: float
    ) -> dict[str, Tensor]:
        """The loss and metrics of a one-update step's micro-batches, summed, from the
        recorded statistics (the proximal log-probs are the values the grad pass had)."""
        sums: dict[str, Tensor] = {}
        with torch.no_grad():
            for rows in micro_batches:
                part = sel[rows]
                _accumulate(sums, *self._micro_loss(part.proximal, entropy[rows], part, num_tokens))
        return sums

    def _pull_coefficients(
        self, entropy: Tensor, sel: Selection, num_tokens: float
    ) -> Tensor | None:
        """Per token of a one-update step, what the gradient of the loss with respect to
        log pi(o_t) gains from Lp-Reg's set: dL / d log pi(o_t) with t in R minus without, at
        the recorded values; zero outside R. None when nothing is regularised."""
        reg_mask = sel.reg_mask
        if reg_mask is None or not bool(reg_mask.any()):
            return None
        point = sel.proximal.detach().clone().requires_grad_(True)
        grads = []
        with torch.enable_grad():
            for reg in (reg_mask, torch.zeros_like(reg_mask)):
                variant = dataclasses.replace(sel, reg_mask=reg)
                loss, _ = self._micro_loss(point, entropy, variant, num_tokens)
                grads.append(torch.autograd.grad(loss, point)[0])
        return torch.where(reg_mask, grads[0] - grads[1], torch.zeros_like(grads[0]))

    def _pull_loss(self, batch: StepBatch, rows: slice, coefficients: Tensor) -> Tensor:
        """sum_t c_t log pi(o_t) over the tokens of ``rows`` with a non-zero coefficient: its
        gradient is what a one-update step's regularised tokens add (see _pull_coefficients)."""
        c = coefficients[rows]
        log_probs, _, _ = self._token_stats(batch, rows, None, select=c != 0)
        return (c.to(log_probs.dtype) * log_probs).sum()

    def _renormalise_gradients(self, provisional: float, num_tokens: float) -> None:
        """Gradients accumulated with the denominator ``provisional`` -> with ``num_tokens`` (the
        decoupled correction masked tokens). Rounding inside the model (e.g. an RMSNorm computed
        in float32) makes this equal to a backward at the final scale to that precision only."""
        if num_tokens == provisional:
            return
        factor = max(provisional, TOKEN_MEAN_EPS) / max(num_tokens, TOKEN_MEAN_EPS)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _single_pass_step(self, batch: StepBatch) -> dict[str, float]:
        """A one-update step in one forward with grad per micro-batch (module docstring)."""
        num = len(batch.sequences)
        lr = float(self.scheduler.get_last_lr()[0])
        # The denominator before decoupled masking: the final one unless tokens are masked.
        provisional = self._num_tokens(batch.mask)
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for rows in self._micro_batches(num):
            log_probs, ent, proxy = self._token_stats(batch, rows, self.loss_config.proxy_filter)
            self._provisional_loss(batch, rows, log_probs, ent, proxy, provisional).backward()
            parts.append((log_probs.detach(), ent.detach(), proxy))
        proximal, entropy, proxy = _concat(parts)
        sel, totals = self._select(batch, proximal, proxy)
        num_tokens = self._num_tokens(sel.mask)
        self._renormalise_gradients(provisional, num_tokens)
        sums = self._recorded_metrics(self._micro_batches(num), entropy, sel, num_tokens)
        coefficients = self._pull_coefficients(entropy, sel, num_tokens)
        if coefficients is not None:
            held = coefficients.ne(0).any(-1).nonzero().flatten().tolist()
            pulled = take_rows(batch, held)
            for micro in self._micro_batches(len(held)):
                self._pull_loss(pulled, micro, coefficients[held]).backward()
        update = {k: float(v) for k, v in sums.items()}
        update["grad_norm"] = self._apply_gradients()
        return _step_record(batch, entropy, sel, totals, [update], lr)


def _concat(
    parts: list[tuple[Tensor, Tensor, Tensor | None]],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Micro-batches' (log-probs, entropy, proxy) -> the step's, in row order."""
    proxies = [p[2] for p in parts if p[2] is not None]
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat(proxies) if proxies else None,
    )


def _accumulate(sums: dict[str, Tensor], loss: Tensor, metrics: dict[str, Tensor]) -> None:
    """Add a micro-batch's loss and metrics (its share of the step's) to ``sums`` (float64)."""
    for k, v in {"loss": loss, **metrics}.items():
        value = v.detach().to(torch.float64)
        sums[k] = sums[k] + value if k in sums else value

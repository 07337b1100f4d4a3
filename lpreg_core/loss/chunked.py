"""The chunked token-statistics path: hidden @ W.T one (chunk, V) block of logits at a time.

Runs on any device with plain torch ops; it is the CPU path of token_stats_from_hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lpreg_core.loss.numerics import compute_dtype
from lpreg_core.loss.stats import grad_logits_inplace, stats_inplace
from lpreg_core.loss_config import ProxyFilter


def _chunk_logits(hidden: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out[:] = hidden @ weight.T in out's dtype (a half-precision matmul is upcast after)."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        return torch.mm(hidden, weight.t(), out=out)
    return out.copy_(torch.mm(hidden, weight.t()))


class ChunkedTokenStats(torch.autograd.Function):
    """log_probs and entropy of hidden @ W.T, recomputing one chunk of logits at a time.

    Inputs: hidden (N, H), weight (V, H), tokens (N,), temperature, proxy (ProxyFilter or None),
    chunk_size. Outputs: log_probs, entropy (N,) and, when a proxy is asked for, the constant
    proxy_log_probs (N,) and keep_count (N,) int64 (else None).

    Forward keeps only (N,) results and the log-normaliser; backward recomputes the logits one
    (N, vocabulary block) at a time, forms d/dlogits in place and feeds the matmuls for hidden
    and W.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        tokens: Tensor,
        temperature: float,
        proxy: ProxyFilter | None,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        log_probs = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        entropy = torch.empty_like(log_probs)
        lse = torch.empty_like(log_probs)
        proxy_log_probs = None if proxy is None else torch.empty_like(log_probs)
        keep_count = (
            None if proxy is None else torch.empty(num_rows, dtype=torch.long, device=hidden.device)
        )
        rows = min(chunk_size, num_rows)
        # Reused across chunks: a fresh (chunk, V) allocation per chunk costs page faults on CPU.
        logits_buf = torch.empty((rows, vocab), dtype=dtype, device=hidden.device)
        work_buf = torch.empty_like(logits_buf)
        spare_buf = (
            torch.empty_like(logits_buf) if temperature != 1.0 and proxy is not None else None
        )
        for start in range(0, num_rows, chunk_size):
            stop = min(num_rows, start + chunk_size)
            n = stop - start
            logits = _chunk_logits(hidden[start:stop], weight, logits_buf[:n])
            stats = stats_inplace(
                logits,
                tokens[start:stop],
                temperature=temperature,
                proxy=proxy,
                work=work_buf[:n],
                spare=None if spare_buf is None else spare_buf[:n],
            )
            log_probs[start:stop] = stats.log_probs
            entropy[start:stop] = stats.entropy
            lse[start:stop] = stats.lse
            if proxy_log_probs is not None and stats.proxy_log_probs is not None:
                proxy_log_probs[start:stop] = stats.proxy_log_probs
            if keep_count is not None and stats.keep_count is not None:
                keep_count[start:stop] = stats.keep_count
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        if proxy_log_probs is not None and keep_count is not None:
            ctx.mark_non_differentiable(proxy_log_probs, keep_count)
        ctx.set_materialize_grads(False)
        return log_probs, entropy, proxy_log_probs, keep_count

    @staticmethod
    def backward(
        ctx: Any,
        grad_log_probs: Tensor | None,
        grad_entropy: Tensor | None,
        _grad_proxy: Tensor | None,
        _grad_keep_count: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 4
        if (grad_log_probs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None, None, *nones)
        temperature: float = ctx.temperature
        chunk_size: int = ctx.chunk_size
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = lse.dtype
        # Backward needs no row-wide threshold, so it walks the vocabulary instead of the tokens:
        # each weight row's gradient is then written once (no read-modify-write of a V x H
        # accumulator per chunk) and all three matmuls see the full token dimension. The block
        # holds as many elements as a forward chunk.
        block = max(1, min(vocab, (chunk_size * vocab) // max(num_rows, 1)))
        acc_dtype = compute_dtype(weight.dtype)
        hidden_acc = hidden.to(acc_dtype)
        grad_hidden = (
            torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device)
            if need_hidden
            else None
        )
        grad_weight = torch.empty_like(weight) if need_weight else None
        logits_storage = torch.empty(num_rows * block, dtype=dtype, device=hidden.device)
        prob_storage = torch.empty_like(logits_storage) if grad_entropy is not None else None
        g_lp = None if grad_log_probs is None else grad_log_probs.to(dtype)
        g_ent = None if grad_entropy is None else grad_entropy.to(dtype)
        for start in range(0, vocab, block):
            stop = min(vocab, start + block)
            width = stop - start
            weight_block = weight[start:stop]
            logits = logits_storage[: num_rows * width].view(num_rows, width)
            grad = grad_logits_inplace(
                _chunk_logits(hidden, weight_block, logits),
                tokens,
                lse,
                entropy,
                g_lp,
                g_ent,
                temperature,
                None
                if prob_storage is None
                else prob_storage[: num_rows * width].view(num_rows, width),
                vocab_offset=start,
            )
            grad = grad.to(acc_dtype)
            if grad_hidden is not None:
                grad_hidden.addmm_(grad, weight_block.to(acc_dtype))
            if grad_weight is not None:
                if grad_weight.dtype == acc_dtype:
                    torch.mm(grad.t(), hidden_acc, out=grad_weight[start:stop])
                else:
                    grad_weight[start:stop] = torch.mm(grad.t(), hidden_acc)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return (grad_hidden, grad_weight, *nones)

"""Lp-Reg's token statistics as Triton kernels: the GPU path of token_stats_from_hidden.

Same results as the chunked path (lpreg_core.loss.chunked) with z = hidden @ W.T never stored:

forward, per (token block, vocabulary split) program, streaming over vocabulary blocks, each
logits tile computed by tl.dot with float32 accumulation (bf16 operands on GPU):
    pass 1  online max m and, at temperature T, s = sum exp((z - m) / T) and
            a = sum exp((z - m) / T) (z - m) / T (for the entropy), the sampled token's logit and,
            in "fixed" mode, s1 = sum exp(z - m) (the temperature-1 normaliser)
    combine the splits' partials (torch, on (splits, N) vectors):
            lse = M / T + log S,  log_probs = z_o / T - lse,  entropy = log S - A / S
    pass 2  (only when a proxy is asked for) with the final row max M: the kept set
            K = {v : exp(z_v - M) >= kappa}  ("minp": p(v) >= kappa max p, at T = 1)
                {v : exp(z_v - M) >= kappa S1} ("fixed": p(v) >= kappa, at T = 1),
            its mass sum_{v in K} exp((z_v - M) / T) and its size; two passes because K depends
            on the final max
    proxy   lpreg_core.loss.stats.proxy_from_kept_set, as on the chunked path; a constant
backward, per vocabulary block (as many elements as chunk_size rows of logits): a kernel
recomputes the logits tile and writes d loss / d z in place of it,
    d log p(o) / dz = (onehot(o) - p) / T,   d H / dz = -p (log p + H) / T,
then two torch matmuls: d hidden += dz @ W_block, d W_block = dz.T @ hidden (each weight row's
gradient written once).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow; for tests). Block sizes
are in TritonBlocks; TritonBlocks.for_device picks them by operand size and shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lpreg_core.loss.numerics import compute_dtype
from lpreg_core.loss.stats import proxy_from_kept_set
from lpreg_core.loss_config import ProxyFilter

__all__ = ["TritonBlocks", "TritonTokenStats", "interpreting"]

_INITIAL_MAX: tl.constexpr = tl.constexpr(-1e30)
"""Start of the running row max: finite, so (m_old - m_new) * s_old is 0, never -inf * 0 = NaN."""


@dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes and launch parameters. block_* must be powers of two >= 16 (tl.dot's minimum).

    vocab_splits: how many programs share one token block's vocabulary (their partial sums are
    combined after); None picks enough to give every streaming multiprocessor a few programs.
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3
    vocab_splits: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_h"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")
        if self.vocab_splits is not None and self.vocab_splits < 1:
            raise ValueError(f"vocab_splits must be >= 1, got {self.vocab_splits}")

    def shared_memory_bytes(self, element_size: int) -> int:
        """Shared memory the pipelined operand tiles take: num_stages copies of a (block_n,
        block_h) hidden tile and a (block_v, block_h) weight tile."""
        tile = (self.block_n + self.block_v) * self.block_h * element_size
        return tile * self.num_stages

    @classmethod
    def for_device(cls, dtype: torch.dtype, device: torch.device) -> TritonBlocks:
        """The tiles to launch with: 128 x 256 where the 16-bit operands' pipeline fits the
        device's shared memory (Hopper-class GPUs; on an H200 with Qwen2.5-7B's head, 1.4x the
        64 x 128 tiles in the train pass and 1.7x in the statistics pass,
        benchmarks/results/gpu-check.json), else the smaller defaults."""
        large = cls(block_n=128, block_v=256)
        if device.type != "cuda" or dtype.itemsize > 2:
            return cls()
        props = torch.cuda.get_device_properties(device)
        available = int(getattr(props, "shared_memory_per_block_optin", 0))
        return large if large.shared_memory_bytes(dtype.itemsize) <= available else cls()


_TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    hidden_size,
    stride_hidden,
    stride_weight,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """z[rows, cols] = hidden[rows] @ weight[cols].T, accumulated over H in ACC_DTYPE."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden
    weight_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight
    for h0 in range(0, hidden_size, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < hidden_size
        x = tl.load(hidden_rows + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(weight_rows + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(
            x.to(DOT_DTYPE),
            tl.trans(w.to(DOT_DTYPE)),
            acc,
            input_precision=PRECISION,
            out_dtype=ACC_DTYPE,
        )
    return acc


@triton.jit
def _row_stats_kernel(
    hidden_ptr,
    weight_ptr,
    tokens_ptr,
    max_ptr,
    sum_ptr,
    plogp_ptr,
    sum1_ptr,
    token_logit_ptr,
    num_rows,
    vocab,
    hidden_size,
    split_width,
    stride_hidden,
    stride_weight,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    NEED_SUM1: tl.constexpr,
):
    """Pass 1: per row and vocabulary split, the online max, sums and the token's logit."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1)
    v_start = split * split_width
    v_stop = tl.minimum(v_start + split_width, vocab)
    m = tl.full((BLOCK_N,), _INITIAL_MAX, ACC_DTYPE)
    s = tl.zeros((BLOCK_N,), ACC_DTYPE)
    a = tl.zeros((BLOCK_N,), ACC_DTYPE)
    s1 = tl.zeros((BLOCK_N,), ACC_DTYPE)
    token_logit = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_hidden,
            stride_weight, BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, ACC_DTYPE, PRECISION,
        )  # fmt: skip
        # Columns past the split hold z = 0 (their weight rows load as 0): excluded below.
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        shift = (m - m_new) * inv_temperature
        scale = tl.exp(shift)
        u = (z - m_new[:, None]) * inv_temperature
        e = tl.where(col_ok[None, :], tl.exp(u), 0.0)
        # Rescale the running sums to the new max: sum e^(u + d) (u + d) = e^d (a + d s).
        a = scale * (a + shift * s) + tl.sum(e * u, axis=1)
        s = scale * s + tl.sum(e, axis=1)
        if NEED_SUM1:
            e1 = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
            s1 = s1 * tl.exp(m - m_new) + tl.sum(e1, axis=1)
        is_token = col_ok[None, :] & (cols[None, :] == tokens[:, None])
        token_logit += tl.sum(tl.where(is_token, z, 0.0), axis=1)
        m = m_new
    out = split * num_rows + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    tl.store(plogp_ptr + out, a, mask=row_ok)
    tl.store(token_logit_ptr + out, token_logit, mask=row_ok)
    if NEED_SUM1:
        tl.store(sum1_ptr + out, s1, mask=row_ok)


@triton.jit
def _kept_mass_kernel(
    hidden_ptr,
    weight_ptr,
    row_max_ptr,
    threshold_ptr,
    kept_sum_ptr,
    kept_count_ptr,
    num_rows,
    vocab,
    hidden_size,
    split_width,
    stride_hidden,
    stride_weight,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 2: per row and split, mass (at T) and size of the kept set exp(z - M) >= threshold."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0.0)
    v_start = split * split_width
    v_stop = tl.minimum(v_start + split_width, vocab)
    kept_sum = tl.zeros((BLOCK_N,), ACC_DTYPE)
    kept_count = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_hidden,
            stride_weight, BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, ACC_DTYPE, PRECISION,
        )  # fmt: skip
        shifted = z - row_max[:, None]
        # The reference's test p(v) >= kappa * max p (or >= kappa) at temperature 1, times the
        # row's temperature-1 normaliser.
        keep = col_ok[None, :] & (tl.exp(shifted) >= threshold[:, None])
        kept_sum += tl.sum(tl.where(keep, tl.exp(shifted * inv_temperature), 0.0), axis=1)
        kept_count += tl.sum(keep.to(tl.int32), axis=1)
    out = split * num_rows + rows
    tl.store(kept_sum_ptr + out, kept_sum, mask=row_ok)
    tl.store(kept_count_ptr + out, kept_count, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    tokens_ptr,
    lse_ptr,
    entropy_ptr,
    grad_log_probs_ptr,
    grad_entropy_ptr,
    out_ptr,
    num_rows,
    width,
    vocab_offset,
    hidden_size,
    stride_hidden,
    stride_weight,
    stride_out,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_GRAD_LOG_PROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """d loss / d z for the vocabulary block [vocab_offset, vocab_offset + width) of weight_ptr."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < width
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_hidden,
        stride_weight, BLOCK_N, BLOCK_V, BLOCK_H, DOT_DTYPE, ACC_DTYPE, PRECISION,
    )  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    log_p = z * inv_temperature - lse[:, None]
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
    if HAS_GRAD_LOG_PROBS:
        g_lp = tl.load(grad_log_probs_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
        tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1) - vocab_offset
        onehot = cols[None, :] == tokens[:, None]
        grad += g_lp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        grad -= (g_ent[:, None] * p) * (log_p + entropy[:, None])
    grad = grad * inv_temperature
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def interpreting() -> bool:
    """Whether these kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 was set when
    this module was imported (the decorator decides, once)."""
    return not isinstance(_row_stats_kernel, triton.runtime.JITFunction)


def _dot_dtype(dtype: torch.dtype) -> Any:
    # Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits
    # (interpreter.py create_dot converts only 8-bit floats). bf16 x bf16 products are exact in
    # float32, so upcasting the tiles there computes what the GPU's bf16 dot with float32
    # accumulation computes.
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision for float32 operands: TF32 only where torch's matmuls would use it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _num_splits(blocks: TritonBlocks, device: torch.device, row_blocks: int, vocab: int) -> int:
    vocab_blocks = triton.cdiv(vocab, blocks.block_v)
    if blocks.vocab_splits is not None:
        return min(blocks.vocab_splits, vocab_blocks)
    if device.type != "cuda":
        return 1
    # A few programs per streaming multiprocessor hide the latency of each one's loads.
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(target, row_blocks)))


class TritonTokenStats(torch.autograd.Function):
    """The same contract as lpreg_core.loss.chunked.ChunkedTokenStats, with Triton kernels.

    Inputs: hidden (N, H), weight (V, H), tokens (N,), temperature, proxy (ProxyFilter or None),
    chunk_size (the backward's vocabulary block holds chunk_size * V elements), blocks.
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
        blocks: TritonBlocks,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        num_rows, hidden_size = hidden.shape
        vocab = weight.shape[0]
        operand_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        dtype = compute_dtype(operand_dtype)
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        tokens = tokens.contiguous()
        device = hidden.device
        row_blocks = triton.cdiv(num_rows, blocks.block_n)
        splits = _num_splits(blocks, device, row_blocks, vocab)
        split_width = triton.cdiv(triton.cdiv(vocab, splits), blocks.block_v) * blocks.block_v
        splits = triton.cdiv(vocab, split_width)  # no empty split
        need_sum1 = proxy is not None and proxy.threshold_mode == "fixed"
        partial = torch.empty((5, splits, num_rows), dtype=dtype, device=device)
        part_max, part_sum, part_plogp, part_sum1, part_token = partial.unbind(0)
        launch: dict[str, Any] = {
            "BLOCK_N": blocks.block_n,
            "BLOCK_V": blocks.block_v,
            "BLOCK_H": blocks.block_h,
            "DOT_DTYPE": _dot_dtype(operand_dtype),
            "ACC_DTYPE": _TL_DTYPES[dtype],
            "PRECISION": _precision(operand_dtype),
            "num_warps": blocks.num_warps,
            "num_stages": blocks.num_stages,
        }
        inv_t = 1.0 / temperature
        common = (num_rows, vocab, hidden_size, split_width, hidden.stride(0), weight.stride(0))
        if num_rows > 0:
            _row_stats_kernel[(row_blocks, splits)](
                hidden, weight, tokens, part_max, part_sum, part_plogp, part_sum1, part_token,
                *common, inv_t, NEED_SUM1=need_sum1, **launch,
            )  # fmt: skip
        # Combine the splits: rescale each partial sum to the row's overall max.
        row_max = part_max.amax(dim=0)
        shift = (part_max - row_max) * inv_t
        scale = shift.exp()
        norm = (scale * part_sum).sum(dim=0)
        plogp = (scale * (part_plogp + shift * part_sum)).sum(dim=0)
        token_logit = part_token.sum(dim=0) * inv_t
        lse = row_max * inv_t + norm.log()
        log_probs = token_logit - lse
        entropy = norm.log() - plogp / norm
        proxy_log_probs = keep_count = None
        if proxy is not None:
            if need_sum1:
                norm1 = ((part_max - row_max).exp() * part_sum1).sum(dim=0)
                threshold = proxy.kappa * norm1
            else:
                threshold = torch.full_like(row_max, proxy.kappa)
            kept_sum = torch.zeros((splits, num_rows), dtype=dtype, device=device)
            kept_count = torch.zeros((splits, num_rows), dtype=torch.int32, device=device)
            if num_rows > 0:
                _kept_mass_kernel[(row_blocks, splits)](
                    hidden, weight, row_max, threshold, kept_sum, kept_count, *common, inv_t,
                    **launch,
                )  # fmt: skip
            keep_count = kept_count.sum(dim=0, dtype=torch.long)
            proxy_log_probs = proxy_from_kept_set(
                lse=lse,
                token_logit=token_logit,
                log_kept_mass=row_max * inv_t + kept_sum.sum(dim=0).log(),
                num_filtered=(vocab - keep_count).to(dtype),
                token_kept=(part_token.sum(dim=0) - row_max).exp() >= threshold,
                temperature=temperature,
            )
            ctx.mark_non_differentiable(proxy_log_probs, keep_count)
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.blocks = blocks
        ctx.launch = launch
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
        nones = (None,) * 5
        if (grad_log_probs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None, None, *nones)
        blocks: TritonBlocks = ctx.blocks
        num_rows, hidden_size = hidden.shape
        vocab = weight.shape[0]
        operand_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        acc_dtype = lse.dtype
        # As in the chunked backward: a vocabulary block of chunk_size rows' worth of elements,
        # so each weight row's gradient is written once.
        width = max(1, min(vocab, (ctx.chunk_size * vocab) // max(num_rows, 1)))
        width = triton.cdiv(width, blocks.block_v) * blocks.block_v
        dz_storage = torch.empty(num_rows * width, dtype=operand_dtype, device=hidden.device)
        hidden_op = hidden.to(operand_dtype)
        grad_hidden = (
            torch.zeros((num_rows, hidden_size), dtype=acc_dtype, device=hidden.device)
            if need_hidden
            else None
        )
        grad_weight = torch.empty_like(weight) if need_weight else None
        dummy = lse  # stands in for an absent gradient; the kernel never reads it
        for start in range(0, vocab, width):
            stop = min(vocab, start + width)
            block_width = stop - start
            weight_block = weight[start:stop]
            dz = dz_storage[: num_rows * block_width].view(num_rows, block_width)
            grid = (triton.cdiv(num_rows, blocks.block_n), triton.cdiv(block_width, blocks.block_v))
            _grad_logits_kernel[grid](
                hidden, weight_block, tokens, lse, entropy,
                dummy if grad_log_probs is None else grad_log_probs.contiguous(),
                dummy if grad_entropy is None else grad_entropy.contiguous(),
                dz, num_rows, block_width, start, hidden_size, hidden.stride(0),
                weight.stride(0), dz.stride(0), 1.0 / ctx.temperature,
                HAS_GRAD_LOG_PROBS=grad_log_probs is not None,
                HAS_GRAD_ENTROPY=grad_entropy is not None, **ctx.launch,
            )  # fmt: skip
            if grad_hidden is not None:
                grad_hidden += torch.mm(dz, weight_block.to(operand_dtype)).to(acc_dtype)
            if grad_weight is not None:
                if grad_weight.dtype == operand_dtype:
                    torch.mm(dz.t(), hidden_op, out=grad_weight[start:stop])
                else:
                    grad_weight[start:stop] = torch.mm(dz.t(), hidden_op)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            grad_weight,
            *nones,
        )

"""token_stats_from_hidden: the learner's entry point to log-probs, entropy and the proxy.

Two implementations of one contract, chosen by the device of the inputs: the Triton kernels
(lpreg_core.loss.triton_stats) on CUDA, the chunked torch path (lpreg_core.loss.chunked) elsewhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lpreg_core.loss.chunked import ChunkedTokenStats
from lpreg_core.loss.numerics import DEFAULT_CHUNK_SIZE
from lpreg_core.loss.stats import TokenStats
from lpreg_core.loss_config import ProxyFilter

StatsBackend = Literal["auto", "chunked", "triton"]


@dataclass(frozen=True)
class BackendChoice:
    """The implementation token_stats_from_hidden runs, and why (for the caller to log)."""

    name: Literal["chunked", "triton"]
    reason: str


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on device, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    from lpreg_core.loss.triton_stats import interpreting

    if interpreting():
        return None
    return (
        f"the Triton kernels need a CUDA device, not {device.type} (CPU tensors run only in "
        "Triton's interpreter: TRITON_INTERPRET=1 before lpreg_core.loss.triton_stats is imported)"
    )


def select_stats_backend(
    backend: StatsBackend, device: torch.device, dtype: torch.dtype
) -> BackendChoice:
    """Which implementation runs for inputs on device in dtype.

    "auto": Triton on CUDA for float32 / bfloat16 / float16 when triton is installed, the
    chunked path otherwise (the reason says which case applied). "triton" raises RuntimeError
    where the kernels cannot run; "chunked" is always possible.
    """
    if backend == "chunked":
        return BackendChoice("chunked", "requested")
    if backend == "triton":
        unavailable = _triton_unavailable(device)
        if unavailable is not None:
            raise RuntimeError(f"backend='triton' cannot run: {unavailable}")
        return BackendChoice("triton", "requested")
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'chunked' or 'triton', got {backend!r}")
    if device.type != "cuda":
        return BackendChoice("chunked", f"{device.type} device")
    if dtype == torch.float64:
        return BackendChoice("chunked", "float64 inputs (the kernels are for float32 and below)")
    unavailable = _triton_unavailable(device)
    if unavailable is not None:
        return BackendChoice("chunked", f"CUDA device, but {unavailable}")
    return BackendChoice("triton", "CUDA device")


def token_stats_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float,
    proxy: ProxyFilter | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: StatsBackend = "auto",
) -> TokenStats:
    """log pi(o_t), entropy and log pi_proxy(o_t) from final hidden states, block by block.

    With z = hidden @ lm_head_weight.T (no bias, as in Qwen/Llama heads)::

        log_probs       = log softmax(z / T)[o_t]                  grad to hidden and weight
        entropy         = -sum_v p_v log p_v,  p = softmax(z / T)   grad to hidden and weight
        proxy_log_probs = proxy_log_probs_from_logits(z, ...)       constant
        proxy_keep_count

    proxy is the loss variant's proxy_filter: None (GRPO and the other baselines) skips the
    kept-set work and leaves proxy_log_probs and proxy_keep_count None.

    Implementations (select_stats_backend): on CUDA, Triton kernels that never store the logits
    in the forward (lpreg_core.loss.triton_stats); elsewhere the chunked torch path described
    here. Both recompute the logits in the backward, in vocabulary blocks of chunk_size * V
    elements.

    Memory (chunked): the forward walks the tokens in chunks of chunk_size rows, holding one
    (chunk_size, V) block of logits and one same-sized work buffer (a third one when T != 1 and a
    proxy is asked for); it cannot split the vocabulary, because the min-p threshold needs the
    whole row. Only hidden, the weight, tokens and two (N,) vectors are saved. The backward
    recomputes the logits in (N, V * chunk_size / N) vocabulary blocks, the same number of
    elements as a forward chunk, so each weight row's gradient is written once. Beyond the weight
    and its gradient, memory is O(chunk_size * V + N * H). Cost: one extra logits matmul (the
    recomputation).

    Results equal lp_reg_from_logits on hidden @ W.T to rounding (1e-5 float32, 1e-10 float64,
    gradients included); entropy is differentiable. Half-precision inputs are computed in
    float32: outputs are float32 and the gradients come back in the inputs' dtypes.

    The proxy uses the weights passed in, so it is the old policy's proxy only when these are the
    step-start weights (the first forward of an on-policy step, or a no-grad pass before the
    updates of an off-policy step whose proxy_log_probs are then kept).

    Args:
        hidden: (..., H) final hidden states at the positions that predict tokens.
        lm_head_weight: (V, H) output embedding.
        tokens: (...) sampled token ids.
        temperature: T of the log-probs and entropy (the proxy's filter is at T = 1).
        proxy: the proxy's noise filter, or None for no proxy.
        chunk_size: tokens per logits chunk (the backward's block holds chunk_size * V elements).
        backend: "auto" (by device, see select_stats_backend), "chunked" or "triton".
    Returns:
        TokenStats with (...)-shaped tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree on leading axes"
        )
    shape = tokens.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1)
    dtype = torch.promote_types(hidden.dtype, lm_head_weight.dtype)
    if select_stats_backend(backend, hidden.device, dtype).name == "triton":
        from lpreg_core.loss.triton_stats import TritonBlocks, TritonTokenStats

        log_probs, entropy, proxy_log_probs, keep_count = TritonTokenStats.apply(
            flat_hidden,
            lm_head_weight,
            flat_tokens,
            float(temperature),
            proxy,
            int(chunk_size),
            TritonBlocks.for_device(dtype, hidden.device),
        )
    else:
        log_probs, entropy, proxy_log_probs, keep_count = ChunkedTokenStats.apply(
            flat_hidden, lm_head_weight, flat_tokens, float(temperature), proxy, int(chunk_size)
        )
    return TokenStats(
        log_probs=log_probs.reshape(shape),
        entropy=entropy.reshape(shape),
        proxy_log_probs=None if proxy_log_probs is None else proxy_log_probs.reshape(shape),
        proxy_keep_count=None if keep_count is None else keep_count.reshape(shape),
    )

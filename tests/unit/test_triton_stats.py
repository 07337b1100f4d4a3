"""The Triton kernels of token_stats_from_hidden, run by Triton's interpreter on CPU tensors.

The kernels are imported with TRITON_INTERPRET=1, so they run here exactly as written, tile by
tile, on small shapes whose tiles still split the tokens, the vocabulary (several blocks and
several vocabulary splits per token block) and the hidden size (a partial last block).

Tolerances, against the chunked path in float64 on the same inputs (after rounding them to the
tested dtype), which test_fused_stats and test_loss_golden tie to the reference:
- float64: 1e-10 (golden cases: 1e-6 against the reference's vectors, as test_loss_golden);
- float32: 2e-5 on log-probs, entropy, kept proxy log-probs and gradients (float32 accumulation
  over V <= 97 and H <= 24 of values of order 10);
- bfloat16 inputs: the statistics are float32, 2e-5 as above; the gradients come back in
  bfloat16, so 1e-2 of the largest gradient entry (a few bfloat16 ulps);
- filtered proxy log-probs (about -1e4, float32 spacing 1e-3): 1e-6 relative;
- keep counts exactly.
The interpreter cannot check speed or GPU-only compilation: test_kernels_compile_for_sm90
compiles the kernels for an H100 (sm_90) target with the ptxas that ships with triton, no GPU
needed.

TRITON_INTERPRET must be set before triton is first imported (triton.language's own @jit
functions are decorated then), and other tests in this process may already have imported it; so
test_kernels_under_the_interpreter runs this file again in a fresh process with the variable set,
and only there are the interpreted tests defined.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from lpreg_core.loss import (
    TOKEN_MEAN_EPS,
    LpRegConfig,
    ProxyFilter,
    TokenStats,
    policy_loss,
    select_stats_backend,
    token_stats_from_hidden,
)

pytest.importorskip("triton", reason="triton is in the dev extra (wheels for Linux only)")

F64 = torch.float64
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "data" / "lpreg_golden"
GOLDEN_CASES = json.loads((GOLDEN_DIR / "manifest.json").read_text())["cases"]
GOLDEN_ATOL = 1e-6
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}
BF16_GRAD_RTOL = 1e-2
CHUNK_SIZE = 5  # the backward's vocabulary block: 5 * V / N columns, several blocks per call
STAT_CASES = [
    (1.0, ProxyFilter(0.02)),
    (0.7, ProxyFilter(0.1)),
    (1.3, ProxyFilter(0.005, "fixed")),
    (1.0, None),
]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    module = importlib.import_module("lpreg_core.loss.triton_stats")
    assert module.interpreting(), "triton_stats was imported before TRITON_INTERPRET=1 was set"
    return module


def _small_blocks(kernels: ModuleType) -> Any:
    """16-wide tiles (tl.dot's minimum) and two vocabulary splits per token block."""
    return kernels.TritonBlocks(block_n=16, block_v=16, block_h=16, vocab_splits=2)


def _triton_stats(
    kernels: ModuleType,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    proxy: ProxyFilter | None,
) -> TokenStats:
    log_probs, entropy, proxy_log_probs, keep_count = kernels.TritonTokenStats.apply(
        hidden, weight, tokens, temperature, proxy, CHUNK_SIZE, _small_blocks(kernels)
    )
    return TokenStats(log_probs, entropy, proxy_log_probs, keep_count)


def _problem(dtype: torch.dtype, seed: int, n: int = 40, h: int = 24, v: int = 97) -> dict:
    """LM-like logits (std about 3) and tokens sampled from the policy, plus tokens at the edges
    of the vocabulary and of a 16-wide block."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * (3.0 / h**0.5)
    probs = torch.softmax(hidden @ weight.t(), dim=-1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    tokens[:4] = torch.tensor([0, v - 1, 15, 16])
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "tokens": tokens,
        "grad_log_probs": torch.randn(n, generator=g, dtype=F64),
        "grad_entropy": torch.randn(n, generator=g, dtype=F64),
    }


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, name: str) -> None:
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.1e}"


def _assert_proxy_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    kept = want > -1e3
    _assert_close(got[kept], want[kept], atol, "proxy_log_probs (kept)")
    if not bool(kept.all()):
        rel = ((got[~kept].double() - want[~kept].double()) / want[~kept].double()).abs()
        assert float(rel.max()) <= 1e-6, f"proxy_log_probs (filtered): rel {float(rel.max()):.2e}"


def _run(stats_fn: Any, prob: dict, dtype: torch.dtype) -> tuple[TokenStats, Any, Any]:
    hidden = prob["hidden"].to(dtype, copy=True).requires_grad_()
    weight = prob["weight"].to(dtype, copy=True).requires_grad_()
    stats = stats_fn(hidden, weight, prob["tokens"])
    g_lp, g_ent = prob["grad_log_probs"], prob["grad_entropy"]
    (stats.log_probs.double() * g_lp + stats.entropy.double() * g_ent).sum().backward()
    return stats, hidden.grad, weight.grad


_COMPILE_SCRIPT = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lpreg_core.loss import triton_stats as ts

assert not ts.interpreting()
TILES = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, DOT_DTYPE=tl.bfloat16, ACC_DTYPE=tl.float32,
             PRECISION="ieee")
POINTERS = {"hidden_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
            "tokens_ptr": "*i64", "kept_count_ptr": "*i32"}
# What a launch specialises for a real model (H and V multiples of 16): 16-byte aligned pointers,
# sizes and strides divisible by 16. Without it the loads cannot be pipelined.
DIVISIBLE = {"hidden_size", "stride_hidden", "stride_weight", "split_width", "vocab", "width",
             "vocab_offset", "stride_out"}
for fn, flags in ((ts._row_stats_kernel, dict(NEED_SUM1=True)), (ts._kept_mass_kernel, {}),
                  (ts._grad_logits_kernel, dict(HAS_GRAD_LOG_PROBS=True, HAS_GRAD_ENTROPY=True))):
    constexprs = {**TILES, **flags}
    signature = {
        name: "constexpr" if name in constexprs
        else POINTERS.get(name, "*fp32") if name.endswith("_ptr")
        else "fp32" if name == "inv_temperature" else "i32"
        for name in fn.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (name.endswith("_ptr") or name in DIVISIBLE)}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=8, num_stages=3))
    # Pipelined: the tiles of the next H steps are copied asynchronously while tl.dot runs.
    assert "async_copy" in kernel.asm["ttgir"], fn.__name__ + ": loads not pipelined"
    print(fn.__name__, "compiled, shared memory", kernel.metadata.shared)
"""


# Defined only in the interpreter's process (see the module docstring).
if INTERPRETED:

    @pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize(("temperature", "proxy"), STAT_CASES, ids=str)
    def test_kernels_match_the_float64_reference(
        kernels: ModuleType, dtype: torch.dtype, temperature: float, proxy: ProxyFilter | None
    ) -> None:
        prob = _problem(dtype, seed=0)
        atol = TOLERANCE[dtype]
        got, got_hidden, got_weight = _run(
            lambda h, w, t: _triton_stats(kernels, h, w, t, temperature, proxy), prob, dtype
        )
        # The reference sees the same (rounded) inputs, in float64.
        want, want_hidden, want_weight = _run(
            lambda h, w, t: token_stats_from_hidden(
                h, w, t, temperature=temperature, proxy=proxy, backend="chunked"
            ),
            {**prob, "hidden": prob["hidden"].double(), "weight": prob["weight"].double()},
            F64,
        )
        assert got.log_probs.dtype == (F64 if dtype == F64 else torch.float32)
        _assert_close(got.log_probs, want.log_probs, atol, "log_probs")
        _assert_close(got.entropy, want.entropy, atol, "entropy")
        if proxy is None:
            assert got.proxy_log_probs is None and got.proxy_keep_count is None
        else:
            assert got.proxy_log_probs is not None and want.proxy_log_probs is not None
            assert not got.proxy_log_probs.requires_grad
            _assert_proxy_close(got.proxy_log_probs, want.proxy_log_probs, atol)
            assert torch.equal(got.proxy_keep_count, want.proxy_keep_count)
            # Both kept and filtered sampled tokens are covered.
            assert bool((want.proxy_log_probs > -1e3).any() and (want.proxy_log_probs < -1e3).any())
        assert got_hidden.dtype == dtype and got_weight.dtype == dtype
        for name, g, w in (
            ("hidden", got_hidden, want_hidden),
            ("weight", got_weight, want_weight),
        ):
            tol = atol if dtype != torch.bfloat16 else BF16_GRAD_RTOL * float(w.abs().max())
            _assert_close(g, w, tol, f"grad {name}")

    @pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
    def test_golden_cases_through_the_kernels(kernels: ModuleType, case: dict[str, Any]) -> None:
        """hidden = logits and an identity head: the kernels reproduce the authors' vectors."""
        with np.load(GOLDEN_DIR / case["file"]) as data:
            arrays = {name: data[name] for name in data.files}
        cfg = LpRegConfig(
            **{k: case[k] for k in ("kappa", "threshold_mode", "rho_neg", "rho_pos", "beta")},
            **{k: case[k] for k in ("clip_low", "clip_high", "temperature", "loss_agg_mode")},
            ranking="micro_batch",
        )
        batch, length, vocab = arrays["logits_cur"].shape
        eye = torch.eye(vocab, dtype=F64)
        tokens = torch.tensor(arrays["tokens"]).reshape(-1)
        hidden = torch.tensor(arrays["logits_cur"]).reshape(-1, vocab).requires_grad_()
        cur = _triton_stats(kernels, hidden, eye, tokens, cfg.temperature, cfg.proxy_filter)
        with torch.no_grad():
            old_logits = torch.tensor(arrays["logits_old"]).reshape(-1, vocab)
            old = _triton_stats(kernels, old_logits, eye, tokens, cfg.temperature, cfg.proxy_filter)
        assert old.proxy_log_probs is not None and old.proxy_keep_count is not None
        mask = torch.tensor(arrays["response_mask"])
        num_tokens = (
            float(mask.sum()) + TOKEN_MEAN_EPS
            if cfg.loss_agg_mode == "token-mean"
            else float(batch)
        )
        loss, _ = policy_loss(
            cur.log_probs.reshape(batch, length),
            old.log_probs.reshape(batch, length),
            old.proxy_log_probs.reshape(batch, length),
            torch.tensor(arrays["advantages"]),
            mask,
            config=cfg,
            num_tokens=num_tokens,
        )
        loss.backward()
        assert hidden.grad is not None
        for name, got in (
            ("loss", loss),
            ("grad_logits_cur", hidden.grad),
            ("log_probs", cur.log_probs),
            ("entropy", cur.entropy),
            ("old_log_probs", old.log_probs),
            ("proxy_log_probs", old.proxy_log_probs),
        ):
            want = torch.from_numpy(arrays[name]).reshape(got.shape)
            _assert_close(got, want, GOLDEN_ATOL, name)
        assert torch.equal(
            old.proxy_keep_count, torch.from_numpy(arrays["proxy_keep_count"]).reshape(-1).long()
        )

    def test_only_the_requested_gradients(kernels: ModuleType) -> None:
        prob = _problem(torch.float32, seed=1)
        weight = prob["weight"].clone().requires_grad_()
        for which in ("log_probs", "entropy"):
            weight.grad = None
            stats = _triton_stats(kernels, prob["hidden"], weight, prob["tokens"], 0.8, None)
            getattr(stats, which).sum().backward()
            ref_weight = prob["weight"].double().requires_grad_()
            ref = token_stats_from_hidden(
                prob["hidden"].double(), ref_weight, prob["tokens"], temperature=0.8, proxy=None
            )
            getattr(ref, which).sum().backward()
            assert weight.grad is not None and ref_weight.grad is not None
            _assert_close(weight.grad, ref_weight.grad, 2e-5, f"grad weight of {which}")
        with torch.no_grad():
            stats = _triton_stats(kernels, prob["hidden"], weight, prob["tokens"], 1.0, None)
        assert stats.log_probs.grad_fn is None

    def test_empty_input(kernels: ModuleType) -> None:
        hidden = torch.zeros(0, 16, requires_grad=True)
        weight = torch.randn(40, 16, requires_grad=True)
        stats = _triton_stats(
            kernels, hidden, weight, torch.zeros(0, dtype=torch.long), 1.0, ProxyFilter(0.02)
        )
        assert stats.log_probs.shape == (0,) and stats.proxy_keep_count is not None
        assert stats.proxy_keep_count.shape == (0,)
        (stats.log_probs.sum() + stats.entropy.sum()).backward()
        assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))

    def test_public_entry_point_runs_the_kernels_on_request(kernels: ModuleType) -> None:
        """token_stats_from_hidden(backend="triton") with its default tiles, (..., H) shaped."""
        prob = _problem(torch.float32, seed=2, n=24)
        hidden = prob["hidden"].reshape(2, 12, -1)
        tokens = prob["tokens"].reshape(2, 12)
        kwargs: dict[str, Any] = {"temperature": 1.0, "proxy": ProxyFilter(0.02)}
        got = token_stats_from_hidden(hidden, prob["weight"], tokens, backend="triton", **kwargs)
        want = token_stats_from_hidden(hidden, prob["weight"], tokens, backend="chunked", **kwargs)
        assert got.log_probs.shape == (2, 12)
        for name in ("log_probs", "entropy", "proxy_log_probs"):
            _assert_close(getattr(got, name), getattr(want, name), 2e-5, name)

    def test_tile_sizes_are_checked(kernels: ModuleType) -> None:
        with pytest.raises(ValueError, match="block_v"):
            kernels.TritonBlocks(block_v=24)
        with pytest.raises(ValueError, match="vocab_splits"):
            kernels.TritonBlocks(vocab_splits=0)

    def test_tiles_follow_the_operands_and_the_device(kernels: ModuleType) -> None:
        blocks = kernels.TritonBlocks
        # 3 stages of a 128 x 64 hidden tile and a 256 x 64 weight tile, 2 bytes each.
        assert blocks(block_n=128, block_v=256).shared_memory_bytes(2) == 3 * 384 * 64 * 2
        cpu = torch.device("cpu")
        assert blocks.for_device(torch.bfloat16, cpu) == blocks()
        assert blocks.for_device(torch.float32, cpu) == blocks()

else:

    def test_kernels_under_the_interpreter() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", __file__],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, f"{out.stdout[-6000:]}\n{out.stderr[-2000:]}"
        assert " passed" in out.stdout

    def test_kernels_compile_for_sm90() -> None:
        """What the interpreter never checks (e.g. globals a GPU kernel may not read, tl.dot layout
        rules, software pipelining of the tile loads): the bfloat16 kernels compile to an H100
        binary, with no GPU present."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
        out = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.count("compiled") == 3

    def test_backend_choice_follows_the_device(
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        assert select_stats_backend("auto", cpu, torch.float32).name == "chunked"
        assert select_stats_backend("auto", cuda, torch.bfloat16).name == "triton"
        assert select_stats_backend("auto", cuda, F64).name == "chunked"
        assert select_stats_backend("chunked", cuda, torch.bfloat16).name == "chunked"
        # Without triton, CUDA falls back to the chunked path and says why; asking for it raises.
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "triton" else real_find_spec(name, *a),
        )
        choice = select_stats_backend("auto", cuda, torch.bfloat16)
        assert choice.name == "chunked" and "triton is not installed" in choice.reason
        with pytest.raises(RuntimeError, match="triton is not installed"):
            select_stats_backend("triton", cuda, torch.bfloat16)

    def test_cpu_tensors_need_the_interpreter_for_the_kernels() -> None:
        with pytest.raises(RuntimeError, match="need a CUDA device, not cpu"):
            token_stats_from_hidden(
                torch.zeros(2, 16),
                torch.zeros(32, 16),
                torch.zeros(2, dtype=torch.long),
                temperature=1.0,
                proxy=None,
                backend="triton",
            )

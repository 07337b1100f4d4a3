"""Peak memory and time of the LM-head statistics Lp-Reg needs: naive full logits vs fused chunks.

Both paths compute, for N tokens with hidden size H and vocabulary V, the log-prob of the sampled
token (with gradient to the hidden states and the LM-head weight), the entropy and the min-p proxy
log-prob, then run backward through sum(w * log_probs):

  naive  the reference's way: full (N, V) logits, log_softmax, verl's entropy_from_logits and
         the authors' apply_min_p clone-and-mask for the proxy.
  fused  lpreg_core.loss.token_stats_from_hidden: one (chunk, V) block at a time, recomputed in
         backward.

Each path runs in its own subprocess, so its peak RSS (VmHWM of that process) is its own.
The weight (V x H) and its gradient are in both peaks. One JSON object goes to stdout:
peak_mem_ratio and time_ratio are fused / naive (wall clock, fastest of --repeats);
cpu_time_ratio compares process CPU time, the steadier figure on a shared machine (the load
average at the end is reported). Tokens are sampled from the policy itself, so most survive the
min-p filter as in a real rollout; max_abs_err_vs_float64 shows each path's own rounding error.

    .venv/bin/python benchmarks/bench_lpreg_loss.py            # N=2048, H=896, V=151936 (Qwen2.5-0.5B head)
    .venv/bin/python benchmarks/bench_lpreg_loss.py --quick    # N=512, under a minute on 2 cores

--device cuda measures in one process (CUDA events, torch.cuda peak allocations above the inputs)
the learner's two passes for each path, in bfloat16 by default at N=8192, H=5120, V=151936 (a
Qwen3-14B head):
  proxy pass  no-grad log-probs, entropy and min-p proxy (the step-start pass)
  train pass  log-probs and entropy, then backward through sum(w * log_probs) (no proxy)
for naive, chunked (token_stats_from_hidden, backend="chunked"), triton (backend="triton", the
CUDA default) and liger: Liger-Kernel's fused linear cross-entropy (train pass only: -sum log p,
no entropy, no proxy), the speed reference, when liger_kernel imports (pure Python:
pip install --no-deps liger-kernel==0.8.5); else liger_ms is null and liger_reason says why.
Each figure is the median of --repeats after two warm-up runs. naive_ms, chunked_ms, triton_ms
and liger_ms are train passes; step_ms adds the proxy pass. Tile sizes from --triton-blocks are
also swept (train and proxy pass each). The JSON goes to stdout and to --out
(default benchmarks/results/lpreg-loss-cuda.json).

    python3 benchmarks/bench_lpreg_loss.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.loss import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    ProxyFilter,
    select_stats_backend,
    token_stats_from_hidden,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_NUM_WEIGHT_ROWS_COMPARED = 4096
"""Rows of the (V, H) weight gradient written out for the comparison (all of it would be GBs)."""
_NUM_FLOAT64_ROWS = 64
"""Tokens recomputed in float64 to measure each path's own rounding error."""
_SAMPLE_CHUNK = 128
"""Rows of logits at a time when sampling the benchmark's tokens (in the parent, not measured)."""


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    VmHWM is the high-water mark of this process image; ru_maxrss would also count the parent's
    pages inherited through fork before exec, which hid the fused path's peak under the parent's.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(
    args: argparse.Namespace, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic hidden states, head weight and loss weights with LM-like logits."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dtype = _DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.hidden, generator=gen, device=device).to(dtype)
    # Logit standard deviation about 3, so min-p at kappa=0.02 keeps a few dozen tokens per row.
    # Scaled in place: a temporary copy of the weight would inflate both peaks by V * H * 4 bytes.
    weight = torch.randn(args.vocab, args.hidden, generator=gen, device=device)
    weight = weight.mul_(3.0 / args.hidden**0.5).to(dtype)
    loss_weights = torch.randn(args.n, generator=gen, dtype=torch.float64, device=device)
    return hidden.requires_grad_(), weight.requires_grad_(), loss_weights.to(dtype)


def _sample_tokens(
    args: argparse.Namespace, hidden: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Tokens drawn from the policy itself, as in a rollout: most survive min-p, a few are noise."""
    gen = torch.Generator(device=hidden.device).manual_seed(args.seed + 1)
    samples = []
    with torch.no_grad():
        head = weight.detach().float()
        for rows in hidden.detach().split(_SAMPLE_CHUNK):
            logits = rows.float() @ head.t()
            probs = torch.softmax(logits / args.temperature, dim=-1)
            samples.append(torch.multinomial(probs, 1, generator=gen).squeeze(-1))
    return torch.cat(samples)


def _naive_stats(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-logits path as the Lp-Reg fork of verl 0.3 computes it (dp_actor, torch_functional).

    log_softmax replaces verl's per-row logsumexp loop (logprobs_from_logits_v2), which takes
    about 14 ms per row on this CPU and would make the baseline a strawman.
    """
    logits = hidden @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    scaled = logits / args.temperature if args.temperature != 1.0 else logits
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        # entropy_from_logits: logsumexp(z) - sum(softmax(z) * z)
        probs = torch.softmax(scaled, dim=-1)
        entropy = torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)
        del probs
        # apply_min_p: chunks of 4096 rows, clone, softmax at T = 1, filtered logits := -1e4.
        filtered_chunks = []
        for chunk in torch.split(logits.detach(), 4096, dim=0):
            cloned = chunk.clone()
            chunk_probs = torch.softmax(cloned, dim=-1)
            threshold = args.kappa * torch.amax(chunk_probs, dim=-1, keepdim=True)
            cloned[chunk_probs < threshold] = -1e4
            del chunk_probs
            filtered_chunks.append(cloned)
        filtered = torch.cat(filtered_chunks, dim=0)
        del filtered_chunks
        filtered.div_(args.temperature)
        proxy = torch.log_softmax(filtered, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        del filtered
    return log_probs, entropy, proxy


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    hidden, weight, loss_weights = _inputs(args)
    tokens = torch.load(args.tokens)
    setup_rss = _peak_rss_bytes()
    times_s, forward_times_s, cpu_times_s = [], [], []
    for _ in range(args.repeats):
        hidden.grad = None
        weight.grad = None
        start = time.perf_counter()
        cpu_start = time.process_time()
        if args.worker == "naive":
            log_probs, entropy, proxy = _naive_stats(hidden, weight, tokens, args)
        else:
            stats = token_stats_from_hidden(
                hidden,
                weight,
                tokens,
                temperature=args.temperature,
                proxy=ProxyFilter(kappa=args.kappa),
                chunk_size=args.chunk_size,
            )
            log_probs, entropy, proxy = stats.log_probs, stats.entropy, stats.proxy_log_probs
        forward_times_s.append(time.perf_counter() - start)
        (log_probs * loss_weights.to(log_probs.dtype)).sum().backward()
        times_s.append(time.perf_counter() - start)
        cpu_times_s.append(time.process_time() - cpu_start)
    assert hidden.grad is not None and weight.grad is not None
    result = {
        "forward_s": min(forward_times_s),
        "total_s": min(times_s),
        "all_total_s": times_s,
        "cpu_s": min(cpu_times_s),
        "setup_rss_bytes": setup_rss,
        "peak_rss_bytes": _peak_rss_bytes(),
        "log_probs": log_probs.detach(),
        "entropy": entropy.detach(),
        "proxy_log_probs": proxy.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight_rows": torch.cat(
            [weight.grad[:_NUM_WEIGHT_ROWS_COMPARED], weight.grad[tokens]], dim=0
        ),
    }
    torch.save(result, args.out)


def _float64_errors(
    args: argparse.Namespace,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    results: dict[str, dict],
) -> dict[str, dict[str, float]]:
    """Max abs error of each path against float64 on the first rows (kept proxy tokens only)."""
    rows = min(args.n, _NUM_FLOAT64_ROWS)
    with torch.no_grad():
        logits = hidden.detach()[:rows].double() @ weight.detach().double().t()
        log_softmax = torch.log_softmax(logits / args.temperature, dim=-1)
        idx = tokens[:rows].unsqueeze(-1)
        want = {
            "log_probs": log_softmax.gather(-1, idx).squeeze(-1),
            "entropy": -(log_softmax.exp() * log_softmax).sum(dim=-1),
        }
        probs = torch.softmax(logits, dim=-1)
        filtered = logits.masked_fill(probs < args.kappa * probs.amax(dim=-1, keepdim=True), -1e4)
        proxy = torch.log_softmax(filtered / args.temperature, dim=-1).gather(-1, idx).squeeze(-1)
    kept = proxy > -1e3
    errors = {}
    for kind, result in results.items():
        errs = {
            key: float((result[key][:rows].double() - value).abs().max())
            for key, value in want.items()
        }
        errs["proxy_log_probs_kept"] = float(
            (result["proxy_log_probs"][:rows].double()[kept] - proxy[kept]).abs().max()
        )
        errors[kind] = errs
    return errors


def _run_worker(kind: str, args: argparse.Namespace, out: Path, tokens_path: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--out",
        str(out),
        "--n",
        str(args.n),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        str(args.threads),
        "--temperature",
        str(args.temperature),
        "--kappa",
        str(args.kappa),
        "--seed",
        str(args.seed),
        "--repeats",
        str(args.repeats),
        "--tokens",
        str(tokens_path),
    ]
    subprocess.run(cmd, check=True)
    return torch.load(out)


def _max_abs_diffs(naive: dict, fused: dict) -> dict[str, float]:
    diffs = {}
    for key in ("log_probs", "entropy", "grad_hidden", "grad_weight_rows"):
        diffs[key] = float((naive[key].double() - fused[key].double()).abs().max())
    # Filtered tokens sit near -1e4, where float32 spacing is 1e-3: compare kept tokens absolutely.
    kept = naive["proxy_log_probs"] > -1e3
    diffs["proxy_log_probs_kept"] = float(
        (naive["proxy_log_probs"][kept].double() - fused["proxy_log_probs"][kept].double())
        .abs()
        .max()
    )
    filtered = ~kept
    diffs["proxy_log_probs_filtered_rel"] = (
        float(
            (
                (
                    naive["proxy_log_probs"][filtered].double()
                    - fused["proxy_log_probs"][filtered].double()
                )
                / naive["proxy_log_probs"][filtered].double().abs()
            )
            .abs()
            .max()
        )
        if filtered.any()
        else 0.0
    )
    return diffs


# ---------------------------------------------------------------------------------------------
# In-process measurement (--device cuda): the learner's two passes per path
# ---------------------------------------------------------------------------------------------

_WARMUP_RUNS = 2
"""Untimed runs before timing: Triton compiles its kernels, cuBLAS picks its algorithms."""
_DEFAULT_TRITON_BLOCKS = "64x128x64w8s3,128x128x64w8s3,64x256x64w8s3,128x256x64w8s3"


def _parse_blocks(text: str) -> list[Any]:
    """'64x128x64w8s3,...' -> TritonBlocks(block_n=64, block_v=128, block_h=64, num_warps=8,
    num_stages=3) each."""
    from lpreg_core.loss.triton_stats import TritonBlocks

    blocks = []
    for item in filter(None, text.split(",")):
        tiles, _, rest = item.partition("w")
        warps, _, stages = rest.partition("s")
        n, v, h = (int(x) for x in tiles.split("x"))
        blocks.append(TritonBlocks(n, v, h, num_warps=int(warps), num_stages=int(stages)))
    return blocks


def _naive_train(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train pass of the full-logits path: differentiable log-probs, no-grad entropy."""
    logits = (hidden @ weight.t()).float()
    scaled = logits / temperature if temperature != 1.0 else logits
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        probs = torch.softmax(scaled, dim=-1)
        entropy = torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)
    return log_probs, entropy


class _Timer:
    """Wall time of fn() in milliseconds: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Any) -> float:
        for _ in range(_WARMUP_RUNS):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return float(sorted(times)[len(times) // 2])

    def peak_bytes(self, fn: Any) -> int | None:
        """Peak device allocation during fn() above what was allocated before it (GPU only)."""
        if self.device.type != "cuda":
            return None
        self._sync()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self._sync()
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _liger_loss() -> tuple[Any, str | None, str | None]:
    """Liger-Kernel's fused linear cross-entropy (sum over tokens), its version, or the reason."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        return None, None, f"liger_kernel does not import: {exc}"
    return LigerFusedLinearCrossEntropyLoss(reduction="sum"), _package_version("liger-kernel"), None


def _in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Every path's two passes, timed and measured in this process (see the module docstring)."""
    device = torch.device(args.device)
    hidden, weight, loss_weights = _inputs(args, args.device)
    tokens = _sample_tokens(args, hidden, weight)
    proxy = ProxyFilter(kappa=args.kappa)
    timer = _Timer(device, args.repeats)
    rows = min(args.n, _NUM_FLOAT64_ROWS)

    def zero_grads() -> None:
        hidden.grad = None
        weight.grad = None

    def stats_fn(backend: str, blocks: Any = None) -> Any:
        """(hidden, proxy or None) -> TokenStats through one backend (blocks: a tile sweep)."""
        if blocks is None:
            return lambda h, p: token_stats_from_hidden(
                h, weight, tokens, temperature=args.temperature, proxy=p,
                chunk_size=args.chunk_size, backend=backend,
            )  # fmt: skip
        from lpreg_core.loss import TokenStats
        from lpreg_core.loss.triton_stats import TritonTokenStats

        return lambda h, p: TokenStats(
            *TritonTokenStats.apply(h, weight, tokens, args.temperature, p, args.chunk_size, blocks)
        )

    def passes(fn: Any) -> tuple[Any, Any]:
        def proxy_pass() -> Any:
            with torch.no_grad():
                return fn(hidden, proxy)

        def train_pass() -> Any:
            zero_grads()
            stats = fn(hidden, None)
            (stats.log_probs * loss_weights.to(stats.log_probs.dtype)).sum().backward()
            return stats

        return proxy_pass, train_pass

    def naive_proxy_pass() -> Any:
        with torch.no_grad():
            return _naive_stats(hidden, weight, tokens, args)

    def naive_train_pass() -> Any:
        zero_grads()
        log_probs, entropy = _naive_train(hidden, weight, tokens, args.temperature)
        (log_probs * loss_weights.to(log_probs.dtype)).sum().backward()
        return log_probs, entropy

    paths: dict[str, tuple[Any, Any]] = {"naive": (naive_proxy_pass, naive_train_pass)}
    skipped: dict[str, str] = {}
    for backend in ("chunked", "triton"):
        try:
            select_stats_backend(backend, device, hidden.dtype)  # type: ignore[arg-type]
        except RuntimeError as exc:
            skipped[backend] = str(exc)
            continue
        paths[backend] = passes(stats_fn(backend))
    liger, liger_version, liger_reason = _liger_loss()
    if liger is not None and device.type == "cuda":

        def liger_train_pass() -> None:
            zero_grads()
            liger(weight, hidden, tokens).backward()

        paths["liger"] = (None, liger_train_pass)
    elif liger is not None:
        liger_reason = "Liger's kernels need a CUDA device"

    report: dict[str, Any] = {"proxy_pass_ms": {}, "train_pass_ms": {}, "peak_mem_bytes": {}}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for name, (proxy_pass, train_pass) in paths.items():
        report["train_pass_ms"][name] = timer.median_ms(train_pass)
        peaks = {"train_pass": timer.peak_bytes(train_pass)}
        out: dict[str, torch.Tensor] = {}
        if name != "liger":
            result = train_pass()
            log_probs, entropy = (result.log_probs, result.entropy) if name != "naive" else result
            out["log_probs"], out["entropy"] = log_probs[:rows].detach(), entropy[:rows].detach()
        assert hidden.grad is not None and weight.grad is not None
        out["grad_hidden"] = hidden.grad[:rows].float()
        out["grad_weight_rows"] = weight.grad[tokens[:rows]].float()
        if proxy_pass is not None:
            report["proxy_pass_ms"][name] = timer.median_ms(proxy_pass)
            peaks["proxy_pass"] = timer.peak_bytes(proxy_pass)
            result = proxy_pass()
            proxy_log_probs = result.proxy_log_probs if name != "naive" else result[2]
            out["proxy_log_probs"] = proxy_log_probs[:rows]
        report["peak_mem_bytes"][name] = peaks
        outputs[name] = out
        zero_grads()

    sweep = []
    if "triton" in paths:
        for blocks in _parse_blocks(args.triton_blocks):
            proxy_pass, train_pass = passes(stats_fn("triton", blocks))
            sweep.append(
                {
                    "blocks": dataclasses.asdict(blocks),
                    "train_pass_ms": timer.median_ms(train_pass),
                    "proxy_pass_ms": timer.median_ms(proxy_pass),
                }
            )
            zero_grads()
    return _in_process_report(
        args, device, hidden, weight, tokens, report, outputs, sweep, skipped,
        liger_version, liger_reason,
    )  # fmt: skip


def _in_process_report(
    args: argparse.Namespace,
    device: torch.device,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    report: dict[str, Any],
    outputs: dict[str, dict[str, torch.Tensor]],
    sweep: list[dict[str, Any]],
    skipped: dict[str, str],
    liger_version: str | None,
    liger_reason: str | None,
) -> dict[str, Any]:
    train, proxy, peaks = report["train_pass_ms"], report["proxy_pass_ms"], report["peak_mem_bytes"]
    step = {name: train[name] + proxy[name] for name in proxy}
    rows = min(args.n, _NUM_FLOAT64_ROWS)
    with torch.no_grad():
        logits = hidden.detach()[:rows].double() @ weight.detach().double().t()
        log_softmax = torch.log_softmax(logits / args.temperature, dim=-1)
        idx = tokens[:rows].unsqueeze(-1)
        probs = torch.softmax(logits, dim=-1)
        filtered = logits.masked_fill(probs < args.kappa * probs.amax(dim=-1, keepdim=True), -1e4)
        want = {
            "log_probs": log_softmax.gather(-1, idx).squeeze(-1),
            "entropy": -(log_softmax.exp() * log_softmax).sum(dim=-1),
            "proxy_log_probs": torch.log_softmax(filtered / args.temperature, dim=-1)
            .gather(-1, idx)
            .squeeze(-1),
        }
    kept = want["proxy_log_probs"] > -1e3
    errors: dict[str, dict[str, float]] = {}
    grad_diffs: dict[str, dict[str, float]] = {}
    for name, out in outputs.items():
        errs = {}
        for key, value in want.items():
            if key in out:
                got = out[key].double()
                sel = kept if key == "proxy_log_probs" else torch.ones_like(kept)
                errs[key] = float((got[sel] - value[sel]).abs().max())
        errors[name] = errs
        if name != "naive":
            # Liger's gradient is of -sum log p, the others' of sum(w * log p): compare directions
            # only where the upstream gradients agree (every path but liger).
            grad_diffs[name] = {
                key: float((out[key] - outputs["naive"][key]).abs().max())
                / max(float(outputs["naive"][key].abs().max()), 1e-30)
                for key in ("grad_hidden", "grad_weight_rows")
            } if name != "liger" else {}  # fmt: skip
    best = min(sweep, key=lambda r: r["train_pass_ms"] + r["proxy_pass_ms"]) if sweep else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    def peak_of(name: str) -> int | None:
        values = [v for v in peaks.get(name, {}).values() if v is not None]
        return max(values) if values else None

    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "liger_kernel": liger_version,
        "n": args.n,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "kappa": args.kappa,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "naive_ms": train.get("naive"),
        "chunked_ms": train.get("chunked"),
        "triton_ms": train.get("triton"),
        "liger_ms": train.get("liger"),
        "liger_reason": None if "liger" in train else liger_reason,
        "step_ms": step,
        "proxy_pass_ms": proxy,
        "train_pass_ms": train,
        "time_ratio_triton_vs_naive": ratio(train.get("triton"), train.get("naive")),
        "time_ratio_triton_vs_liger": ratio(train.get("triton"), train.get("liger")),
        "step_time_ratio_triton_vs_naive": ratio(step.get("triton"), step.get("naive")),
        "peak_mem_bytes": peaks,
        "peak_mem_ratio_triton_vs_naive": ratio(peak_of("triton"), peak_of("naive")),
        "peak_mem_ratio_triton_vs_liger": ratio(peak_of("triton"), peak_of("liger")),
        "max_abs_err_vs_float64": errors,
        "grad_max_rel_diff_vs_naive": grad_diffs,
        "skipped_paths": skipped,
        "triton_blocks_sweep": sweep,
        "best_triton_blocks": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N=512 (a smoke run under a minute)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every path in this process, as --device cuda always does",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="tokens (default 2048, 512 with --quick; 8192 on cuda)",
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="hidden size H (default 896; 5120 on cuda)"
    )
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default float32; bfloat16 on cuda"
    )
    parser.add_argument(
        "--triton-blocks",
        default=_DEFAULT_TRITON_BLOCKS,
        help="Triton tiles to sweep, NxVxH w<warps> s<stages>, comma-separated",
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        help="also write the JSON here (default with --device cuda: "
        "benchmarks/results/lpreg-loss-cuda.json)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="fused rows per chunk"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kappa", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per path: the fastest counts on cpu (default 1), the median in process "
        "(default 5)",
    )
    parser.add_argument("--order", choices=["naive-first", "fused-first"], default="naive-first")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    in_process = on_gpu or args.in_process
    if args.n is None:
        args.n = 512 if args.quick else 8192 if on_gpu else 2048
    if args.hidden is None:
        args.hidden = 5120 if on_gpu else 896
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.repeats is None:
        args.repeats = 5 if in_process else 1
    if args.worker:
        _worker(args)
        return
    if in_process:
        result = _in_process(args)
        text = json.dumps(result, indent=1)
        out = args.json_out or (
            REPO_ROOT / "benchmarks" / "results" / "lpreg-loss-cuda.json" if on_gpu else None
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        print(text)
        return

    torch.set_num_threads(args.threads)
    hidden, weight, _ = _inputs(args)
    tokens = _sample_tokens(args, hidden, weight)
    with tempfile.TemporaryDirectory(prefix="bench_lpreg_") as tmp:
        tokens_path = Path(tmp) / "tokens.pt"
        torch.save(tokens, tokens_path)
        kinds = ["naive", "fused"] if args.order == "naive-first" else ["fused", "naive"]
        results = {
            kind: _run_worker(kind, args, Path(tmp) / f"{kind}.pt", tokens_path) for kind in kinds
        }
    naive, fused = results["naive"], results["fused"]
    diffs = _max_abs_diffs(naive, fused)
    report = {
        "n": args.n,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
        "temperature": args.temperature,
        "kappa": args.kappa,
        "device": "cpu",
        "torch": torch.__version__,
        "naive_peak_rss_bytes": naive["peak_rss_bytes"],
        "fused_peak_rss_bytes": fused["peak_rss_bytes"],
        "peak_mem_ratio": fused["peak_rss_bytes"] / naive["peak_rss_bytes"],
        "naive_setup_rss_bytes": naive["setup_rss_bytes"],
        "fused_setup_rss_bytes": fused["setup_rss_bytes"],
        "peak_mem_ratio_above_setup": (fused["peak_rss_bytes"] - fused["setup_rss_bytes"])
        / (naive["peak_rss_bytes"] - naive["setup_rss_bytes"]),
        "naive_s": naive["total_s"],
        "fused_s": fused["total_s"],
        "time_ratio": fused["total_s"] / naive["total_s"],
        "naive_cpu_s": naive["cpu_s"],
        "fused_cpu_s": fused["cpu_s"],
        "cpu_time_ratio": fused["cpu_s"] / naive["cpu_s"],
        "load_average_1m": os.getloadavg()[0],
        "naive_forward_s": naive["forward_s"],
        "fused_forward_s": fused["forward_s"],
        "max_abs_diff": max(v for k, v in diffs.items() if not k.endswith("_rel")),
        "max_abs_diff_by_output": diffs,
        "max_abs_value_by_output": {
            key: float(naive[key].double().abs().max())
            for key in ("log_probs", "entropy", "grad_hidden", "grad_weight_rows")
        },
        "max_abs_err_vs_float64": _float64_errors(args, hidden, weight, tokens, results),
        "naive_all_s": naive["all_total_s"],
        "fused_all_s": fused["all_total_s"],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

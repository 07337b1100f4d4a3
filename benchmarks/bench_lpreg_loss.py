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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.loss import DEFAULT_CHUNK_SIZE, ProxyFilter, token_stats_from_hidden  # noqa: E402

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


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic hidden states, head weight and loss weights with LM-like logits."""
    gen = torch.Generator().manual_seed(args.seed)
    dtype = _DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.hidden, generator=gen).to(dtype)
    # Logit standard deviation about 3, so min-p at kappa=0.02 keeps a few dozen tokens per row.
    # Scaled in place: a temporary copy of the weight would inflate both peaks by V * H * 4 bytes.
    weight = torch.randn(args.vocab, args.hidden, generator=gen).mul_(3.0 / args.hidden**0.5)
    weight = weight.to(dtype)
    loss_weights = torch.randn(args.n, generator=gen, dtype=torch.float64).to(dtype)
    return hidden.requires_grad_(), weight.requires_grad_(), loss_weights


def _sample_tokens(
    args: argparse.Namespace, hidden: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Tokens drawn from the policy itself, as in a rollout: most survive min-p, a few are noise."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    samples = []
    with torch.no_grad():
        for rows in hidden.detach().split(_SAMPLE_CHUNK):
            logits = rows.float() @ weight.detach().float().t()
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N=512 (a smoke run under a minute)")
    parser.add_argument(
        "--n", type=int, default=None, help="tokens (default 2048, 512 with --quick)"
    )
    parser.add_argument("--hidden", type=int, default=896, help="hidden size H")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="fused rows per chunk"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kappa", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="forward+backward runs per path; the fastest counts"
    )
    parser.add_argument("--order", choices=["naive-first", "fused-first"], default="naive-first")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n is None:
        args.n = 512 if args.quick else 2048
    if args.worker:
        _worker(args)
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

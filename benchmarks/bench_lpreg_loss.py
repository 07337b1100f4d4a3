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

--device cuda measures in one process (CUDA events; torch.cuda peak allocation above the inputs)
naive, the project's path and Liger-Kernel's fused linear cross-entropy as the anchor, on the
same inputs in the same run, at N = 8,192 and 32,768 (--sizes) with Qwen2.5-7B's head (H = 3,584,
V = 152,064) and bfloat16 inputs. Each path's train pass (forward, then backward through
sum(w * log_probs)) is timed as the median of --repeats (5) after two warm-up runs:
  naive    full (N, V) logits, log_softmax (and the no-grad entropy)
  project  token_stats_from_hidden with the Triton kernels (the CUDA default): log-probs and
           entropy, the (N, V) logits never materialised
  liger    LigerFusedLinearCrossEntropyLoss(reduction="sum"): -sum log p, no entropy, no proxy
Liger is imported from the installed package or else from a carried wheel (--liger-wheel, or
benchmarks/wheels/liger_kernel-*.whl: pure Python, imported from the zip); without either,
liger_ms is null and liger_reason says why. Per size ("8192", "32768") the JSON has exactly
naive_ms (null where it does not fit: out of memory), project_ms, liger_ms, project_extra_gb,
liger_extra_gb (GB = 1e9 bytes), time_ratio_vs_liger, mem_ratio_vs_liger (project / liger) and
max_abs_err_vs_float64 (each path's log-probs on the first 64 tokens against float64); top-level
device, the settings, goals_met (time <= 1.3x Liger at every size, below naive, extra peak memory
<= 2x Liger's) and detail: per size the chunked path, the proxy pass (no-grad log-probs, entropy
and min-p proxy, the learner's step-start pass) and step_ms = train + proxy pass, every peak, the
errors of every output, gradients against naive's, and the --triton-blocks tile sweep. The JSON
goes to stdout and to --json-out (default benchmarks/results/lpreg-loss-cuda.json).

    python3 benchmarks/bench_lpreg_loss.py --device cuda

--smoke runs that same code path on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)
at tiny shapes, in under a minute, to check the JSON (timings and memory are meaningless there).

    .venv/bin/python benchmarks/bench_lpreg_loss.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# --smoke runs the CUDA mode's code on CPU tensors through Triton's interpreter, which must be
# chosen before triton is first imported (lpreg_core.loss imports it).
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_loss_helpers import (  # noqa: E402
    DEFAULT_TRITON_BLOCKS,
    DTYPES,
    NUM_FLOAT64_ROWS,
    NUM_WEIGHT_ROWS_COMPARED,
    Timer,
    float64_reference,
    inputs,
    liger_loss,
    naive_stats,
    naive_train,
    package_version,
    parse_blocks,
    peak_rss_bytes,
    sample_tokens,
)

from lpreg_core.loss import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    ProxyFilter,
    select_stats_backend,
    token_stats_from_hidden,
)


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    hidden, weight, loss_weights = inputs(args)
    tokens = torch.load(args.tokens)
    setup_rss = peak_rss_bytes()
    times_s, forward_times_s, cpu_times_s = [], [], []
    for _ in range(args.repeats):
        hidden.grad = None
        weight.grad = None
        start = time.perf_counter()
        cpu_start = time.process_time()
        if args.worker == "naive":
            log_probs, entropy, proxy = naive_stats(hidden, weight, tokens, args)
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
        "peak_rss_bytes": peak_rss_bytes(),
        "log_probs": log_probs.detach(),
        "entropy": entropy.detach(),
        "proxy_log_probs": proxy.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight_rows": torch.cat(
            [weight.grad[:NUM_WEIGHT_ROWS_COMPARED], weight.grad[tokens]], dim=0
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
    rows = min(args.n, NUM_FLOAT64_ROWS)
    want = float64_reference(hidden, weight, tokens, args.temperature, args.kappa, rows)
    proxy = want.pop("proxy_log_probs")
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
# In-process measurement (--device cuda; --in-process; --smoke): every path at each size
# ---------------------------------------------------------------------------------------------

_GB = 1e9
_CUDA_SIZES = "8192,32768"
_CUDA_HIDDEN, _CUDA_VOCAB = 3584, 152064
"""The LM head of Qwen2.5-7B (hidden size, vocabulary)."""
_SMOKE_SIZES, _SMOKE_HIDDEN, _SMOKE_VOCAB = "32,64", 32, 256
_SMOKE_BLOCKS = "16x32x16w4s1"
_TIME_GOAL_VS_LIGER = 1.3
_MEM_GOAL_VS_LIGER = 2.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _gb(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / _GB


def _project_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The project's path on this device: the Triton kernels where they run, else what "auto"
    picks (the chunked path), with the reason."""
    try:
        return select_stats_backend("triton", device, dtype).name, "triton kernels"
    except RuntimeError as exc:
        choice = select_stats_backend("auto", device, dtype)
        return choice.name, f"{exc}; auto picked {choice.name} ({choice.reason})"


def _measure_size(
    args: argparse.Namespace, n: int, device: torch.device, liger: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One size: (the issue's figures, the detail) for naive, project, chunked and liger."""
    size_args = argparse.Namespace(**{**vars(args), "n": n})
    hidden, weight, loss_weights = inputs(size_args, args.device)
    tokens = sample_tokens(size_args, hidden, weight)
    proxy = ProxyFilter(kappa=args.kappa)
    timer = Timer(device, args.repeats)
    rows = min(n, NUM_FLOAT64_ROWS)
    project_backend, project_reason = _project_backend(device, hidden.dtype)

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
            return naive_stats(hidden, weight, tokens, args)

    def naive_train_pass() -> Any:
        zero_grads()
        log_probs, entropy = naive_train(hidden, weight, tokens, args.temperature)
        (log_probs * loss_weights.to(log_probs.dtype)).sum().backward()
        return log_probs, entropy

    paths: dict[str, tuple[Any, Any]] = {
        "naive": (naive_proxy_pass, naive_train_pass),
        "project": passes(stats_fn(project_backend)),
    }
    if project_backend != "chunked":
        paths["chunked"] = passes(stats_fn("chunked"))
    if liger is not None:

        def liger_train_pass() -> None:
            zero_grads()
            liger(weight, hidden, tokens).backward()

        paths["liger"] = (None, liger_train_pass)

    train: dict[str, float] = {}
    proxy_ms: dict[str, float] = {}
    peaks: dict[str, dict[str, int | None]] = {}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    failed: dict[str, str] = {}
    for name, (proxy_pass, train_pass) in paths.items():
        try:
            train[name] = timer.median_ms(train_pass)
            peaks[name] = {"train_pass": timer.peak_bytes(train_pass)}
            out: dict[str, torch.Tensor] = {}
            if name != "liger":
                result = train_pass()
                log_probs, entropy = (
                    (result.log_probs, result.entropy) if name != "naive" else result
                )
                out["log_probs"], out["entropy"] = (
                    log_probs[:rows].detach(),
                    entropy[:rows].detach(),
                )
            assert hidden.grad is not None and weight.grad is not None
            out["grad_hidden"] = hidden.grad[:rows].float()
            out["grad_weight_rows"] = weight.grad[tokens[:rows]].float()
            if proxy_pass is not None:
                proxy_ms[name] = timer.median_ms(proxy_pass)
                peaks[name]["proxy_pass"] = timer.peak_bytes(proxy_pass)
                result = proxy_pass()
                proxy_log_probs = result.proxy_log_probs if name != "naive" else result[2]
                out["proxy_log_probs"] = proxy_log_probs[:rows]
            outputs[name] = out
        except torch.OutOfMemoryError as exc:
            # The naive path's full (N, V) logits do not fit at the larger sizes: reported as
            # null with the reason, the other paths still measured.
            failed[name] = f"out of memory: {str(exc).splitlines()[0]}"
            train.pop(name, None)
            proxy_ms.pop(name, None)
        finally:
            zero_grads()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    sweep = []
    if project_backend == "triton" and "project" in train:
        for blocks in parse_blocks(args.triton_blocks):
            proxy_pass, train_pass = passes(stats_fn("triton", blocks))
            sweep.append(
                {
                    "blocks": dataclasses.asdict(blocks),
                    "train_pass_ms": timer.median_ms(train_pass),
                    "proxy_pass_ms": timer.median_ms(proxy_pass),
                }
            )
            zero_grads()

    want = float64_reference(hidden, weight, tokens, args.temperature, args.kappa, rows)
    kept = want["proxy_log_probs"] > -1e3
    errors: dict[str, dict[str, float]] = {}
    grad_diffs: dict[str, dict[str, float]] = {}
    for name, out in outputs.items():
        errs = {}
        for key, value in want.items():
            if key in out:
                sel = kept if key == "proxy_log_probs" else torch.ones_like(kept)
                errs[key] = float((out[key].double()[sel] - value[sel]).abs().max())
        errors[name] = errs
        # Liger's gradient is of -sum log p, the others' of sum(w * log p): only the others'
        # gradients are compared with the naive path's.
        if name not in ("naive", "liger") and "naive" in outputs:
            grad_diffs[name] = {
                key: float((out[key] - outputs["naive"][key]).abs().max())
                / max(float(outputs["naive"][key].abs().max()), 1e-30)
                for key in ("grad_hidden", "grad_weight_rows")
            }

    def train_peak(name: str) -> int | None:
        return peaks.get(name, {}).get("train_pass")

    figures = {
        "naive_ms": train.get("naive"),
        "project_ms": train.get("project"),
        "liger_ms": train.get("liger"),
        "project_extra_gb": _gb(train_peak("project")),
        "liger_extra_gb": _gb(train_peak("liger")),
        "time_ratio_vs_liger": _ratio(train.get("project"), train.get("liger")),
        "mem_ratio_vs_liger": _ratio(train_peak("project"), train_peak("liger")),
        "max_abs_err_vs_float64": {
            name: errs["log_probs"] for name, errs in errors.items() if "log_probs" in errs
        },
    }
    step = {name: train[name] + proxy_ms[name] for name in proxy_ms if name in train}
    detail = {
        "project_backend": project_backend,
        "project_backend_reason": project_reason,
        "failed": failed,
        "naive_extra_gb": _gb(train_peak("naive")),
        "chunked_ms": train.get("chunked"),
        "time_ratio_vs_naive": _ratio(train.get("project"), train.get("naive")),
        "train_pass_ms": train,
        "proxy_pass_ms": proxy_ms,
        "step_ms": step,
        "step_time_ratio_vs_naive": _ratio(step.get("project"), step.get("naive")),
        "peak_mem_bytes": peaks,
        "max_abs_err_vs_float64": errors,
        "grad_max_rel_diff_vs_naive": grad_diffs,
        "triton_blocks_sweep": sweep,
        "best_triton_blocks": min(sweep, key=lambda r: r["train_pass_ms"] + r["proxy_pass_ms"])
        if sweep
        else None,
    }
    return figures, detail


def _in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Every path at every size of --sizes, measured in this process (see the module docstring).

    Per size (the issue's figures): naive_ms, project_ms, liger_ms (train passes, median of
    --repeats), project_extra_gb and liger_extra_gb (peak allocation above the inputs during the
    train pass; CUDA only), their ratios, and each path's max abs error of the log-probs against
    float64. Everything else is under "detail"."""
    device = torch.device(args.device)
    liger, liger_version, liger_reason = liger_loss(args.liger_wheel)
    if liger is not None and device.type != "cuda":
        liger, liger_reason = None, "Liger's kernels need a CUDA device"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "liger_kernel": liger_version,
        "liger_reason": liger_reason,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "kappa": args.kappa,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "sizes": sizes,
    }
    detail: dict[str, Any] = {}
    for n in sizes:
        print(f"bench_lpreg_loss: N={n}", file=sys.stderr, flush=True)
        result[str(n)], detail[str(n)] = _measure_size(args, n, device, liger)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the size's tensors went with _measure_size's frame
    figures = [result[str(n)] for n in sizes]

    def all_of(values: list[bool | None]) -> bool | None:
        return None if any(v is None for v in values) else all(values)

    result["goals_met"] = {
        f"time_le_{_TIME_GOAL_VS_LIGER}x_liger": all_of(
            [None if f["time_ratio_vs_liger"] is None else f["time_ratio_vs_liger"]
             <= _TIME_GOAL_VS_LIGER for f in figures]
        ),
        "time_below_naive": all_of(
            [f["project_ms"] < f["naive_ms"] for f in figures if f["naive_ms"] is not None]
            or [None]
        ),
        f"mem_le_{_MEM_GOAL_VS_LIGER}x_liger": all_of(
            [None if f["mem_ratio_vs_liger"] is None else f["mem_ratio_vs_liger"]
             <= _MEM_GOAL_VS_LIGER for f in figures]
        ),
    }  # fmt: skip
    if device.type != "cuda":
        result["peak_memory_reason"] = "peak memory is measured on CUDA devices only"
    result["detail"] = detail
    return result


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
        "--smoke",
        action="store_true",
        help="the --device cuda code path on CPU under TRITON_INTERPRET=1, tiny shapes (a test)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="tokens on cpu (default 2048, 512 with --quick); in process, the same as --sizes N",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"token counts measured in process, comma-separated (default {_CUDA_SIZES})",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help=f"hidden size H (default 896 on cpu; {_CUDA_HIDDEN} in process)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help=f"vocabulary size V (default 151936 on cpu; {_CUDA_VOCAB} in process)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default float32; bfloat16 on cuda"
    )
    parser.add_argument(
        "--triton-blocks",
        default=None,
        help="Triton tiles to sweep, NxVxH w<warps> s<stages>, comma-separated "
        f"(default {DEFAULT_TRITON_BLOCKS})",
    )
    parser.add_argument(
        "--liger-wheel",
        type=Path,
        default=None,
        help="a liger_kernel wheel to import Liger from when it is not installed "
        "(default: benchmarks/wheels/liger_kernel-*.whl)",
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
    if args.smoke:
        args.device, args.in_process = "cpu", True
        args.sizes = args.sizes or _SMOKE_SIZES
        args.hidden = args.hidden or _SMOKE_HIDDEN
        args.vocab = args.vocab or _SMOKE_VOCAB
        args.triton_blocks = args.triton_blocks or _SMOKE_BLOCKS
        args.repeats = args.repeats or 1
        args.chunk_size = min(args.chunk_size, 32)
        args.dtype = args.dtype or "float32"
        args.threads = 1
    on_gpu = args.device == "cuda"
    in_process = on_gpu or args.in_process
    if in_process:
        args.sizes = args.sizes or (str(args.n) if args.n else _CUDA_SIZES)
        args.n = None
    elif args.n is None:
        args.n = 512 if args.quick else 2048
    if args.hidden is None:
        args.hidden = _CUDA_HIDDEN if in_process else 896
    if args.vocab is None:
        args.vocab = _CUDA_VOCAB if in_process else 151936
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.repeats is None:
        args.repeats = 5 if in_process else 1
    args.triton_blocks = args.triton_blocks or DEFAULT_TRITON_BLOCKS
    if args.worker:
        _worker(args)
        return
    if in_process:
        torch.set_num_threads(args.threads)
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
    hidden, weight, _ = inputs(args)
    tokens = sample_tokens(args, hidden, weight)
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

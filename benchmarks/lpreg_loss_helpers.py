"""Shared parts of benchmarks/bench_lpreg_loss.py: inputs, the naive full-logits paths, the
float64 reference, timing and Liger-Kernel's anchor."""

from __future__ import annotations

import argparse
import importlib.metadata
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
NUM_WEIGHT_ROWS_COMPARED = 4096
"""Rows of the (V, H) weight gradient written out for the comparison (all of it would be GBs)."""
NUM_FLOAT64_ROWS = 64
"""Tokens recomputed in float64 to measure each path's own rounding error."""
SAMPLE_CHUNK = 128
"""Rows of logits at a time when sampling the benchmark's tokens (in the parent, not measured)."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    VmHWM is the high-water mark of this process image; ru_maxrss would also count the parent's
    pages inherited through fork before exec, which hid the fused path's peak under the parent's.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inputs(
    args: argparse.Namespace, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic hidden states, head weight and loss weights with LM-like logits."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.hidden, generator=gen, device=device).to(dtype)
    # Logit standard deviation about 3, so min-p at kappa=0.02 keeps a few dozen tokens per row.
    # Scaled in place: a temporary copy of the weight would inflate both peaks by V * H * 4 bytes.
    weight = torch.randn(args.vocab, args.hidden, generator=gen, device=device)
    weight = weight.mul_(3.0 / args.hidden**0.5).to(dtype)
    loss_weights = torch.randn(args.n, generator=gen, dtype=torch.float64, device=device)
    return hidden.requires_grad_(), weight.requires_grad_(), loss_weights.to(dtype)


def sample_tokens(
    args: argparse.Namespace, hidden: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Tokens drawn from the policy itself, as in a rollout: most survive min-p, a few are noise."""
    gen = torch.Generator(device=hidden.device).manual_seed(args.seed + 1)
    samples = []
    with torch.no_grad():
        head = weight.detach().float()
        for rows in hidden.detach().split(SAMPLE_CHUNK):
            logits = rows.float() @ head.t()
            probs = torch.softmax(logits / args.temperature, dim=-1)
            samples.append(torch.multinomial(probs, 1, generator=gen).squeeze(-1))
    return torch.cat(samples)


def naive_stats(
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


WARMUP_RUNS = 2
"""Untimed runs before timing: Triton compiles its kernels, cuBLAS picks its algorithms."""
DEFAULT_TRITON_BLOCKS = "64x128x64w8s3,128x128x64w8s3,64x256x64w8s3,128x256x64w8s3"


def parse_blocks(text: str) -> list[Any]:
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


def naive_train(
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


class Timer:
    """Wall time of fn() in milliseconds: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Any) -> float:
        for _ in range(WARMUP_RUNS):
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


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


LIGER_WHEEL_DIRS = (Path(__file__).resolve().parent / "wheels",)
"""Where a carried liger_kernel wheel (pure Python: liger_kernel-*-py3-none-any.whl) is looked for
when the package is not installed; --liger-wheel names one directly."""


def add_liger_wheel(path: Path | None) -> str | None:
    """Unpack a liger_kernel wheel (pure Python) into a temporary folder and put it on sys.path
    (zipimport alone cannot import the package's namespace subpackages); returns the wheel used,
    or None when none was found."""
    candidates = [path] if path is not None else []
    for folder in LIGER_WHEEL_DIRS:
        candidates += sorted(folder.glob("liger_kernel-*.whl"), reverse=True)
    for wheel in candidates:
        if wheel.is_file():
            target = Path(tempfile.mkdtemp(prefix="lpreg-liger-"))
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
            sys.path.insert(0, str(target))
            return str(wheel)
    return None


def liger_loss(wheel: Path | None = None) -> tuple[Any, str | None, str | None]:
    """Liger-Kernel's fused linear cross-entropy (sum over tokens), its version, or the reason."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        carried = add_liger_wheel(wheel)
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            where = f" (nor from {carried})" if carried else " and no wheel was found"
            return None, None, f"liger_kernel is not installed{where}: {exc}"
        version = Path(carried).name.split("-")[1] if carried else None
        return LigerFusedLinearCrossEntropyLoss(reduction="sum"), version, None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum"), package_version("liger-kernel"), None


def float64_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    kappa: float,
    rows: int,
) -> dict[str, torch.Tensor]:
    """Log-probs, entropy and min-p proxy log-probs of the first ``rows`` tokens in float64."""
    with torch.no_grad():
        logits = hidden.detach()[:rows].double() @ weight.detach().double().t()
        log_softmax = torch.log_softmax(logits / temperature, dim=-1)
        idx = tokens[:rows].unsqueeze(-1)
        probs = torch.softmax(logits, dim=-1)
        filtered = logits.masked_fill(probs < kappa * probs.amax(dim=-1, keepdim=True), -1e4)
        return {
            "log_probs": log_softmax.gather(-1, idx).squeeze(-1),
            "entropy": -(log_softmax.exp() * log_softmax).sum(dim=-1),
            "proxy_log_probs": torch.log_softmax(filtered / temperature, dim=-1)
            .gather(-1, idx)
            .squeeze(-1),
        }

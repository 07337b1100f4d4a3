"""The learner on a GPU, checked in one run: correctness, speed and a short training run.

Five parts, each recorded even when another fails (a part that cannot run says why); the JSON is
rewritten after each part, so a run stopped by a timeout keeps what it finished:

  correctness  one learner step on the tiny model (examples/tiny/model) on --device with fp32
               master weights and compute in learner.compute_dtype (auto: bfloat16 on CUDA),
               against the same step on the CPU in float64: loss and gradient differences (max
               abs, and relative: ||g - g_ref|| / ||g_ref||), for Lp-Reg (the tiny config's loss)
               and plain GRPO. Gradient clipping is off so the raw gradients are compared.
  speed        the learner step (Trainer.step: the no-grad statistics pass, then forward and
               backward with the Lp-Reg loss, then AdamW) on a randomly initialised model of
               Qwen2.5-1.5B's shape (no weights are downloaded), 64 sequences x 1,024 tokens:
               tokens/s, peak GPU memory, MFU = 6 * params * tokens / step time / the device's
               peak dense bf16 FLOP/s, and the ratio of the step time to a bare forward+backward
               of the same model on the same tokens (transformers' own cross-entropy over full
               logits, same micro-batches, no optimiser) timed in the same run.
  fsdp2        benchmarks/gpu_fsdp_step.py under `torchrun --nproc-per-node 1` (NCCL on CUDA): the
               FSDP2 sharded trainer's step against the plain trainer's, its sharded checkpoint
               written and restored bit for bit, and its speed on the Qwen2.5-1.5B shape.
  kernel       benchmarks/bench_lpreg_loss.py --device cuda: the fused Lp-Reg statistics
               (Triton) against full logits and Liger-Kernel's fused linear cross-entropy.
  end_to_end   `lpreg local examples/tiny/config.yaml` with the learner and the hf generators on
               --device (learner.steps=50 by default): every generator must load the final
               version (summary.json's generator_weight_versions).

The two-process NCCL weight broadcast needs two GPUs: NCCL refuses two ranks on one device, so on
a one-GPU machine it does not run and the JSON says so (the end-to-end run broadcasts over Gloo).

    python3 benchmarks/gpu_check.py                         # CUDA; scripts/gpu_check.sh wraps it
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check.json

--quick shrinks every shape (a 2-layer model, 4 x 64 tokens, 2 end-to-end steps) so the same code
runs on a CPU in about a minute; its figures are not measurements. The JSON goes to --out
(default benchmarks/results/gpu-check.json) and, when $OUT is set, to $OUT/gpu-check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lpreg_core.config import LearnerConfig  # noqa: E402
from lpreg_core.devices import compute_dtype  # noqa: E402
from lpreg_core.wire.lpreg.v1 import rollout_pb2  # noqa: E402
from services.learner.trainer import StepBatch, Trainer, build_batch  # noqa: E402

TINY_MODEL = REPO_ROOT / "examples" / "tiny" / "model"
TINY_CONFIG = REPO_ROOT / "examples" / "tiny" / "config.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "gpu-check.json"

# Peak dense bf16 tensor-core FLOP/s (NVIDIA data sheets; the sparse figures are twice these).
# Checked in order: the first entry whose words all appear in the device name wins.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12}

# Qwen2.5-1.5B's shape (its config.json), weights left random.
QWEN25_15B_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
QUICK_SHAPE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

NCCL_ONE_GPU_REASON = (
    "the two-process NCCL broadcast needs two GPUs: NCCL refuses two ranks on one device "
    "(ncclInvalidUsage, duplicate GPU), so it is not run on a machine with {n} visible GPU(s); "
    "tests/integration/test_broadcast.py covers the same protocol over Gloo"
)

# A bf16 forward and backward carries about 3 significant digits; the gradient of the whole
# model against a float64 reference agrees to within a few percent when nothing is wrong
# (a wrong cast or a lost autocast region shows as a difference of order one).
GRAD_REL_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def failure(exc: BaseException) -> dict[str, Any]:
    """A part that failed: the error and the end of its traceback."""
    return {
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc()[-3000:],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": importlib.metadata.version("transformers"),
    }
    try:
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        env["triton"] = None
        env["triton_reason"] = "triton is not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_count"] = torch.cuda.device_count()
        env["device_memory_bytes"] = int(props.total_memory)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["device_count"] = 0
    return env


def peak_bf16_flops(device: torch.device) -> tuple[float | None, str | None]:
    """The device's peak dense bf16 FLOP/s, or None and why."""
    if device.type != "cuda":
        return None, "MFU is defined against a GPU's tensor-core peak; this ran on the CPU"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if all(part in name for part in key.split()):
            return flops, None
    return None, f"no peak bf16 FLOP/s on record for {name!r} (known: {sorted(PEAK_BF16_FLOPS)})"


# --- correctness ------------------------------------------------------------------------------


def tiny_groups(model: torch.nn.Module, num_prompts: int, seed: int) -> list[Any]:
    """Groups sampled from the tiny policy itself (plausible tokens, so the min-p proxy keeps
    some), with rewards mixed inside each group so every advantage is non-zero."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_prompts):
        a, b = (int(x) for x in torch.randint(0, 100, (2,), generator=gen))
        ids = tok(f"{a}{'+-'[g % 2]}{b}=")["input_ids"]
        torch.manual_seed(seed + g)
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=True, num_return_sequences=8,
            max_new_tokens=8, top_k=0, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        group = rollout_pb2.RolloutGroup(task_id=f"t{g}", prompt_token_ids=ids)
        for i, row in enumerate(out[:, len(ids) :].tolist()):
            toks = [t for t in row if t != tok.pad_token_id] or [tok.eos_token_id]
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=toks,
                    logprobs=behaviour_log_probs(model, ids, toks),
                    versions=[0] * len(toks),
                    reward=float((i + g) % 2),
                )
            )
        groups.append(group)
    return groups


def behaviour_log_probs(
    model: torch.nn.Module, prompt: list[int], tokens: list[int]
) -> list[float]:
    """The sampler's own log-probs of its tokens, as a generator reports them: importance weights
    near 1, so off-policy masking (a hard cut at the cap) does not decide the compared loss."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
    picked = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return picked.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def step_and_grads(
    model: torch.nn.Module,
    config: LearnerConfig,
    batch: StepBatch,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    trainer = Trainer(model, config, device=device, compute_dtype=dtype)
    stats = trainer.step(batch)
    grads = {
        n: p.grad.detach().to("cpu", torch.float64)
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return stats, grads


def compare_step(
    loss: dict[str, Any],
    learner: dict[str, Any],
    batch: StepBatch,
    device: torch.device,
    compute: str,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    config = LearnerConfig.model_validate(
        {
            **learner,
            "loss": loss,
            "compute_dtype": compute,
            "optimizer": {**learner.get("optimizer", {}), "grad_clip": 1e30},
        }
    )
    reference = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float64)
    ref_stats, ref_grads = step_and_grads(
        reference, config, batch, torch.device("cpu"), torch.float64
    )
    candidate = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    dtype = compute_dtype(config, torch.float32, device)
    stats, grads = step_and_grads(candidate, config, batch, device, dtype)
    assert grads.keys() == ref_grads.keys(), "the two steps produced gradients for other weights"
    diff_sq = sum(float((grads[n] - g).pow(2).sum()) for n, g in ref_grads.items())
    ref_sq = sum(float(g.pow(2).sum()) for g in ref_grads.values())
    grad_rel = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-300)
    per_param = {
        n: float((grads[n] - g).norm() / g.norm().clamp_min(1e-300)) for n, g in ref_grads.items()
    }
    worst = max(per_param, key=lambda n: per_param[n])
    tolerance = GRAD_REL_TOLERANCE.get(dtype, 5e-2)
    return {
        "loss_type": loss["type"],
        "compute_dtype": str(dtype).removeprefix("torch."),
        "master_dtype": "float32",
        "loss": stats["loss"],
        "loss_reference": ref_stats["loss"],
        "loss_abs_diff": abs(stats["loss"] - ref_stats["loss"]),
        "loss_rel_diff": abs(stats["loss"] - ref_stats["loss"])
        / max(abs(ref_stats["loss"]), 1e-300),
        "grad_max_abs_diff": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
        "grad_max_abs_reference": max(float(g.abs().max()) for g in ref_grads.values()),
        "grad_rel_diff": grad_rel,
        "grad_worst_param": worst,
        "grad_worst_param_rel_diff": per_param[worst],
        "num_regularized": stats.get("num_regularized"),
        "num_regularized_reference": ref_stats.get("num_regularized"),
        # Lp-Reg's token selection is discrete: a rounding difference can move a token across
        # the proxy or the rho cut, and then the gradients differ by that token's KL term.
        "same_regularized_count": stats.get("num_regularized") == ref_stats.get("num_regularized"),
        "entropy": stats["entropy"],
        "entropy_reference": ref_stats["entropy"],
        "grad_rel_tolerance": tolerance,
        "ok": grad_rel <= tolerance and math.isfinite(stats["loss"]),
    }


def correctness(device: torch.device, quick: bool, compute: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    learner = {k: v for k, v in tiny["learner"].items() if k not in ("steps",)}
    sampler = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    groups = tiny_groups(sampler, num_prompts=4 if quick else 16, seed=0)
    batch = build_batch(groups, learner.get("advantage_mode", "std"))
    # Lp-Reg regularises int(rho_neg * negative tokens) tokens: on this small batch the tiny
    # config's rho_neg would select almost none, so a larger one puts the KL term into the
    # gradient being compared.
    losses = [{**learner["loss"], "rho_neg": 0.3}, {"type": "grpo"}]
    results = [compare_step(loss, learner, batch, device, compute) for loss in losses]
    return {
        "reference": "CPU, float64 weights and compute",
        "candidate": f"{device.type}, float32 master weights, compute_dtype={compute}",
        "num_sequences": len(batch.sequences),
        "num_completion_tokens": batch.num_tokens,
        "losses": results,
        "ok": all(r["ok"] for r in results),
    }


# --- speed ------------------------------------------------------------------------------------


def random_groups(
    vocab: int, num_sequences: int, seq_len: int, group_size: int, seed: int
) -> list[Any]:
    """Groups of random tokens: a quarter of each sequence is prompt, the rest completion."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = seq_len // 4
    groups = []
    for g in range(num_sequences // group_size):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        group = rollout_pb2.RolloutGroup(task_id=f"r{g}", prompt_token_ids=prompt)
        for i in range(group_size):
            toks = torch.randint(3, vocab, (seq_len - prompt_len,), generator=gen).tolist()
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=toks,
                    logprobs=[-12.0] * len(toks),
                    versions=[0] * len(toks),
                    reward=float(i % 2),
                )
            )
        groups.append(group)
    return groups


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    found: dict[str, int | None] = {"bytes": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield found
    if device.type == "cuda":
        found["bytes"] = int(torch.cuda.max_memory_allocated(device))


def bare_forward_backward(
    model: torch.nn.Module, batch: StepBatch, micro: int, device: torch.device, dtype: torch.dtype
) -> None:
    """Forward and backward of the plain causal-LM loss (full logits, transformers' own
    cross-entropy) over the same sequences and micro-batches, under the same autocast."""
    seqs = torch.tensor(batch.sequences, device=device)
    num = seqs.shape[0]
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    for start in range(0, num, micro):
        ids = seqs[start : start + micro]
        with autocast:
            out = model(input_ids=ids, labels=ids)
        (out.loss * (ids.shape[0] / num)).backward()
    model.zero_grad(set_to_none=True)


def speed(
    device: torch.device, quick: bool, repeats: int, micro: int, compute: str
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = QUICK_SHAPE if quick else QWEN25_15B_SHAPE
    num_sequences, seq_len = (4, 64) if quick else (64, 1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    num_params = sum(p.numel() for p in model.parameters())
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    config = LearnerConfig.model_validate(
        {
            "loss": tiny["learner"]["loss"],
            "micro_batch_sequences": micro,
            "compute_dtype": compute,
            "optimizer": {"lr": 1e-6},
        }
    )
    dtype = compute_dtype(config, torch.float32, device)
    trainer = Trainer(model, config, device=device, compute_dtype=dtype)
    groups = random_groups(shape["vocab_size"], num_sequences, seq_len, min(8, num_sequences), 0)
    batch = build_batch(groups, "std")
    num_tokens = num_sequences * seq_len
    trainer.step(batch)  # warm-up: kernels compiled and tuned, optimiser state allocated
    with peak_memory(device) as peak:
        step_s = [timed(lambda: trainer.step(batch), device) for _ in range(repeats)]
    bare_forward_backward(model, batch, micro, device, dtype)  # warm-up
    with peak_memory(device) as bare_peak:
        bare_s = [
            timed(lambda: bare_forward_backward(model, batch, micro, device, dtype), device)
            for _ in range(repeats)
        ]
    step = statistics.median(step_s)
    bare = statistics.median(bare_s)
    flops, why = peak_bf16_flops(device)
    result: dict[str, Any] = {
        "model": "Qwen2ForCausalLM with Qwen2.5-1.5B's shape, random weights"
        if not quick
        else "Qwen2ForCausalLM, quick shape (2 layers, hidden 64)",
        "shape": shape,
        "num_params": num_params,
        "num_sequences": num_sequences,
        "sequence_len": seq_len,
        "num_tokens": num_tokens,
        "num_completion_tokens": batch.num_tokens,
        "micro_batch_sequences": micro,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "loss_type": config.loss.type,
        "repeats": repeats,
        "step_s": step,
        "step_s_all": step_s,
        "tokens_per_s": num_tokens / step,
        "peak_memory_bytes": peak["bytes"],
        "bare_forward_backward_s": bare,
        "bare_forward_backward_s_all": bare_s,
        "bare_peak_memory_bytes": bare_peak["bytes"],
        "step_over_bare_forward_backward": step / bare,
        "peak_bf16_flops": flops,
    }
    if flops is None:
        result["mfu"] = None
        result["mfu_reason"] = why
    else:
        result["mfu"] = 6 * num_params * num_tokens / step / flops
        result["bare_mfu"] = 6 * num_params * num_tokens / bare / flops
    if device.type != "cuda":
        result["peak_memory_reason"] = "peak memory is measured on CUDA devices only"
    result["ok"] = all(math.isfinite(t) and t > 0 for t in (*step_s, *bare_s))
    return result


def speed_with_fallback(
    device: torch.device, quick: bool, repeats: int, micro: int, compute: str
) -> dict[str, Any]:
    """The speed part; on running out of GPU memory, once more with half the micro-batch."""
    try:
        return speed(device, quick, repeats, micro, compute)
    except torch.cuda.OutOfMemoryError as exc:
        if micro == 1:
            raise
        first = f"{type(exc).__name__} at micro_batch_sequences={micro}"
    torch.cuda.empty_cache()
    result = speed(device, quick, repeats, micro // 2, compute)
    result["note"] = first
    return result


def run_in_repo(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``argv`` run from the repository root, its output captured as text, unbuffered."""
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# --- end to end -------------------------------------------------------------------------------


def end_to_end(
    device: torch.device, steps: int, quick: bool, timeout_s: float, run_dir: Path | None
) -> dict[str, Any]:
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="lpreg-gpu-check-")) / "run"
    overrides = [
        f"local.run_dir={run_dir}",
        "local.progress=false",
        f"learner.steps={steps}",
        f"learner.device={device.type}",
        f"generator.backend.device={device.type}",
        # One GPU holds the learner and every generator: NCCL refuses two ranks on one device.
        "broadcast.backend=gloo",
    ]
    if device.type == "cuda":
        overrides.append("generator.dtype=bfloat16")
    if quick:
        overrides += ["learner.prompts_per_step=4", "learner.eval_every_steps=0"]
    argv = [sys.executable, "-m", "services.cli", "local", str(TINY_CONFIG)]
    for o in overrides:
        argv += ["--set", o]
    start = time.perf_counter()
    proc = run_in_repo(argv, timeout_s)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "command": "lpreg local examples/tiny/config.yaml "
        + " ".join(f"--set {o}" for o in overrides),
        "returncode": proc.returncode,
        "wall_s": wall,
        "run_dir": str(run_dir),
    }
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        versions = summary.get("generator_weight_versions", {})
        final = summary.get("policy_version")
        result.update(
            steps=summary.get("steps"),
            policy_version=final,
            generator_weight_versions=versions,
            every_generator_loaded_final=bool(versions)
            and all(v == final for v in versions.values()),
            summary=summary,
        )
        rows = run_dir / "metrics.jsonl"
        if rows.exists():
            last = [json.loads(line) for line in rows.read_text().splitlines()][-1]
            result["last_step_metrics"] = last
    else:
        result["every_generator_loaded_final"] = False
        result["why"] = "no summary.json was written"
    result["ok"] = proc.returncode == 0 and result["every_generator_loaded_final"]
    if not result["ok"]:
        logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").exists() else []
        result["stderr_tail"] = proc.stderr[-3000:]
        result["log_tails"] = {p.name: p.read_text()[-2000:] for p in logs}
    return result


# --- FSDP2 and the fused-loss kernels (subprocesses) -----------------------------------------


def subprocess_json(argv: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``argv`` (which writes one JSON object to ``out``) and return that object; a run that
    fails or writes nothing is a failed part with the end of its output."""
    proc = run_in_repo(argv, timeout_s)
    if proc.returncode != 0 or not out.exists():
        return {
            "ok": False,
            "returncode": proc.returncode,
            "why": "the run failed or wrote no JSON",
            "output_tail": (proc.stdout + proc.stderr)[-3000:],
        }
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def fsdp2(device: torch.device, quick: bool, compute: str, repeats: int) -> dict[str, Any]:
    """benchmarks/gpu_fsdp_step.py under ``torchrun --nproc-per-node 1``: the sharded trainer's
    step against the plain one, its sharded checkpoint round trip, and its speed."""
    work = Path(tempfile.mkdtemp(prefix="lpreg-gpu-fsdp-"))
    out = work / "fsdp.json"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        str(REPO_ROOT / "benchmarks" / "gpu_fsdp_step.py"), "--device", device.type,
        "--compute-dtype", compute, "--repeats", str(repeats), "--ckpt-dir", str(work / "ckpt"),
        "--out", str(out),
    ] + (["--quick"] if quick else [])  # fmt: skip
    result = subprocess_json(argv, out, timeout_s=300)
    if "step" in result:
        result["ok"] = bool(
            result["step"].get("ok")
            and result.get("checkpoint", {}).get("ok")
            and result.get("speed", {}).get("ok") is not False
        )
    return result


def kernel(device: torch.device, quick: bool) -> dict[str, Any]:
    """benchmarks/bench_lpreg_loss.py in process on ``device``: naive full logits, the project's
    Triton path and Liger-Kernel's fused linear cross-entropy on the same inputs."""
    out = Path(tempfile.mkdtemp(prefix="lpreg-gpu-kernel-")) / "loss.json"
    argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_lpreg_loss.py")]
    argv += ["--smoke"] if device.type != "cuda" or quick else ["--device", "cuda"]
    result = subprocess_json([*argv, "--json-out", str(out)], out, timeout_s=300)
    result.setdefault("ok", "returncode" not in result)
    return result


# --- main -------------------------------------------------------------------------------------


def run_part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one part's failure is a result; the other parts still run
        result = failure(exc)
    result["part_wall_s"] = time.perf_counter() - start
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the next part (or its subprocess) gets the memory back
    print(f"gpu_check: {name} ok={result.get('ok')}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (code check, not figures)")
    p.add_argument(
        "--compute-dtype", default="auto", help="learner.compute_dtype (auto: bf16 on CUDA)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed learner steps (median)")
    p.add_argument("--micro-batch", type=int, default=8, help="learner.micro_batch_sequences")
    p.add_argument("--e2e-steps", type=int, default=None, help="end-to-end steps (50; quick: 2)")
    p.add_argument("--e2e-timeout-s", type=float, default=300.0)
    p.add_argument("--e2e-dir", type=Path, default=None, help="run directory (default: a new temp)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["correctness", "fsdp2", "speed", "kernel", "end_to_end"],
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    start = time.perf_counter()
    report: dict[str, Any] = {"quick": args.quick, "environment": environment(device)}
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "correctness": lambda: correctness(device, args.quick, args.compute_dtype),
        "fsdp2": lambda: fsdp2(device, args.quick, args.compute_dtype, args.repeats),
        "speed": lambda: speed_with_fallback(
            device, args.quick, args.repeats, args.micro_batch, args.compute_dtype
        ),
        "end_to_end": lambda: end_to_end(
            device,
            args.e2e_steps or (2 if args.quick else 50),
            args.quick,
            args.e2e_timeout_s,
            args.e2e_dir,
        ),
        "kernel": lambda: kernel(device, args.quick),
    }
    outs = [args.out]
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / "gpu-check.json")

    def write() -> None:
        # After every part: a run stopped by a timeout still leaves the parts it finished.
        report["wall_s"] = time.perf_counter() - start
        text = json.dumps(report, indent=2, default=str) + "\n"
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    report["nccl_broadcast"] = {
        "ran": False,
        "why": NCCL_ONE_GPU_REASON.format(n=gpus)
        if gpus < 2
        else "two GPUs are visible: run tests/integration/test_broadcast.py with NCCL separately",
    }
    for name, fn in parts.items():
        report[name] = (
            {"ok": None, "why": "skipped on request (--skip)"}
            if name in args.skip
            else run_part(name, fn)
        )
        write()
    for out in outs:
        print(f"gpu_check: wrote {out}", file=sys.stderr)
    ok = all(report[name].get("ok") is not False for name in parts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

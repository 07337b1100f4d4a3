"""The FSDP2 learner on one device, started by torchrun: the part of benchmarks/gpu_check.py
that needs a process group.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_fsdp_step.py --device cuda --out F.json

Under one rank of ``torch.distributed`` (NCCL on CUDA, Gloo on the CPU) and the learner's own
sharded trainer (``Sharded.trainer``: ``fully_shard`` over a one-device mesh, fp32 master shards,
forward and backward in learner.compute_dtype through ``MixedPrecisionPolicy``):

  step        one Lp-Reg step of the tiny model (examples/tiny/model) on groups it sampled, against
              the same step by the plain ``Trainer`` in the same compute dtype on the same device:
              loss, metrics and the gradients (||g - g_plain|| / ||g_plain||, clipping off). One
              rank shards nothing, but FSDP2 casts the parameters to the compute dtype where the
              plain trainer autocasts op by op, so in bf16 they agree to bf16's rounding.
  checkpoint  the sharded checkpoint (torch.distributed.checkpoint) of that trainer written and
              restored into a fresh model and optimiser: every tensor back bit for bit.
  speed       --speed-shape qwen2.5-1.5b: Lp-Reg steps of a randomly initialised model of that
              shape (64 x 1,024 tokens), tokens/s and peak memory under FSDP2.

One JSON object goes to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_check import (  # noqa: E402
    QUICK_SHAPE,
    QWEN25_15B_SHAPE,
    TINY_CONFIG,
    TINY_MODEL,
    peak_memory,
    random_groups,
    synchronize,
    tiny_groups,
)

from lpreg_core.config import LearnerConfig  # noqa: E402
from lpreg_core.devices import compute_dtype  # noqa: E402
from services.learner.checkpoint import ShardedCheckpointer  # noqa: E402
from services.learner.distributed import Sharded, init_distributed  # noqa: E402
from services.learner.trainer import Trainer, build_batch  # noqa: E402

# Each path's gradient is within gpu_check's GRAD_REL_TOLERANCE of the float64 one; the two
# differ from each other by at most the sum.
GRAD_REL_TOLERANCE = {torch.bfloat16: 1e-1, torch.float16: 4e-2, torch.float32: 1e-4}


def learner_config(compute: str) -> LearnerConfig:
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    learner = {k: v for k, v in tiny["learner"].items() if k != "steps"}
    # A rho_neg large enough for Lp-Reg's KL term to act on this small batch.
    loss = {**learner["loss"], "rho_neg": 0.3}
    optimizer = {**learner.get("optimizer", {}), "grad_clip": 1e30}  # raw gradients compared
    return LearnerConfig.model_validate(
        {**learner, "loss": loss, "compute_dtype": compute, "optimizer": optimizer}
    )


def full_tensors(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) by name, unsharded, on the CPU in float64."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        assert t is not None, name
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        key = name.replace("_checkpoint_wrapped_module.", "")
        out[key] = full.detach().to("cpu", torch.float64).clone()
    return out


def step_part(sharded: Sharded, compute: str, ckpt_dir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    device = sharded.ctx.device
    config = learner_config(compute)
    sampler = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    batch = build_batch(tiny_groups(sampler, num_prompts=8, seed=0), config.advantage_mode)
    plain_model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    dtype = compute_dtype(config, torch.float32, device)
    plain_stats = Trainer(plain_model, config, device=device, compute_dtype=dtype).step(batch)
    plain_grads = full_tensors(plain_model, grads=True)

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    trainer = sharded.trainer(model, config, dtype)
    stats = trainer.step(batch)
    grads = full_tensors(model, grads=True)
    after = full_tensors(model)

    diff_sq = sum(float((grads[n] - g).pow(2).sum()) for n, g in plain_grads.items())
    ref_sq = sum(float(g.pow(2).sum()) for g in plain_grads.values())
    grad_rel = (diff_sq**0.5) / max(ref_sq**0.5, 1e-300)
    tolerance = GRAD_REL_TOLERANCE.get(dtype, 1e-1)
    step = {
        "compute_dtype": str(dtype).removeprefix("torch."),
        "loss": stats["loss"],
        "loss_plain_trainer": plain_stats["loss"],
        "num_regularized": stats.get("num_regularized"),
        "num_regularized_plain_trainer": plain_stats.get("num_regularized"),
        "entropy": stats["entropy"],
        "entropy_plain_trainer": plain_stats["entropy"],
        "grad_rel_diff": grad_rel,
        "grad_rel_tolerance": tolerance,
        "ok": grad_rel <= tolerance,
    }

    checkpointer = ShardedCheckpointer(
        ckpt_dir, model, trainer.optimizer, trainer.scheduler, keep_last=1
    )
    checkpointer.save(1, {"version": 1})
    fresh = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    fresh_trainer = sharded.trainer(fresh, config, dtype)
    restored = ShardedCheckpointer(
        ckpt_dir, fresh, fresh_trainer.optimizer, fresh_trainer.scheduler, keep_last=1
    ).restore()
    back = full_tensors(fresh)
    mismatched = [n for n in after if not torch.equal(after[n], back[n])]
    ckpt = {
        "restored_step": None if restored is None else restored[0],
        "tensors": len(after),
        "tensors_not_bit_identical": mismatched[:10],
        "ok": restored is not None and restored[0] == 1 and not mismatched,
    }
    return {"step": step, "checkpoint": ckpt}


def speed_part(sharded: Sharded, compute: str, quick: bool, repeats: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    device = sharded.ctx.device
    shape = QUICK_SHAPE if quick else QWEN25_15B_SHAPE
    num_sequences, seq_len = (4, 64) if quick else (64, 1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    config = LearnerConfig.model_validate(
        {
            "loss": tiny["learner"]["loss"],
            "micro_batch_sequences": 8,
            "compute_dtype": compute,
            "optimizer": {"lr": 1e-6},
        }
    )
    dtype = compute_dtype(config, torch.float32, device)
    trainer = sharded.trainer(model, config, dtype)
    batch = build_batch(
        random_groups(shape["vocab_size"], num_sequences, seq_len, min(8, num_sequences), 0), "std"
    )
    trainer.step(batch)  # warm-up
    times = []
    with peak_memory(device) as peak:
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            trainer.step(batch)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "model": "Qwen2ForCausalLM, " + ("quick shape" if quick else "Qwen2.5-1.5B's shape"),
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_tokens": num_sequences * seq_len,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": num_sequences * seq_len / step_s,
        "peak_memory_bytes": peak["bytes"],
        "ok": True,
    }


def guarded(fn: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = fn()
        return result
    except Exception as exc:  # a failed part is a result
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--compute-dtype", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    ctx = init_distributed(args.device)
    sharded = Sharded(ctx)
    report: dict[str, Any] = {
        "world_size": ctx.world_size,
        "backend": dist.get_backend(),
        "device": str(ctx.device),
    }
    report.update(guarded(lambda: step_part(sharded, args.compute_dtype, args.ckpt_dir)))
    report["speed"] = (
        {"ok": None, "why": "skipped on request"}
        if args.skip_speed
        else guarded(lambda: speed_part(sharded, args.compute_dtype, args.quick, args.repeats))
    )
    dist.barrier()
    dist.destroy_process_group()
    if ctx.rank == 0:
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

"""One rank of a distributed learner test, started by torchrun (Gloo, CPU, float64).

    torchrun --standalone --nproc-per-node N _dist_worker.py SPEC_JSON

For each of spec["cases"] (a name, a learner config, activation_checkpointing, single_pass): a
fresh tiny model, one DistributedTrainer step on the groups in spec["groups"]; rank 0 writes the step's
metrics (<name>/stats.json), the full gradients as the last update left them
(<name>/grads.safetensors) and the full parameters after the step (<name>/params.safetensors)
under spec["out"]. With spec["save"] (a directory), after the last case: a ShardedCheckpointer
save there, and rank 0 writes the full model and optimiser state (saved/state.safetensors). With
spec["load"]: a fresh model and trainer (last case's config, no activation checkpointing) restore the newest checkpoint
there; rank 0 writes what they hold (loaded/state.safetensors, loaded/loop.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpreg_core.config import LearnerConfig
from lpreg_core.weight_sync import layout_of
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.checkpoint import ShardedCheckpointer
from services.learner.distributed import (
    DistributedTrainer,
    decode_groups,
    encode_groups,
    full_weights,
    init_distributed,
    weights_layout,
)
from services.learner.trainer import build_batch

MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"


def make_groups(seed: int = 0) -> list[rollout_pb2.RolloutGroup]:
    """Groups of completions sampled from the tiny model (plausible tokens, so the min-p proxy
    keeps some), of uneven lengths, rewards mixed inside each group."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64)
    groups = []
    for g, prompt in enumerate(["12+7=", "45-13=", "9+88=", "3+4="]):
        ids = tok(prompt)["input_ids"]
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=True, num_return_sequences=4,
            max_new_tokens=3 + 2 * g, top_k=0, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        group = rollout_pb2.RolloutGroup(task_id=f"t{g}", prompt_token_ids=ids)
        for i, row in enumerate(out[:, len(ids) :].tolist()):
            toks = [t for t in row if t != tok.pad_token_id] or [tok.eos_token_id]
            group.completions.append(
                rollout_pb2.Completion(
                    token_ids=toks,
                    logprobs=[-1.5] * len(toks),
                    versions=[0] * len(toks),
                    reward=float((i + g) % 2),
                )
            )
        groups.append(group)
    return groups


def save_groups(groups: list[rollout_pb2.RolloutGroup], path: Path) -> None:
    path.write_text(json.dumps(encode_groups(groups)))


def load_groups(path: str) -> list[rollout_pb2.RolloutGroup]:
    return decode_groups(json.loads(Path(path).read_text()))


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) model and optimiser tensors by name; collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    out = {f"model.{k}": v.detach().clone() for k, v in model_sd.items()}
    for name, entry in optim_sd.get("state", {}).items():  # empty off rank 0
        for key, value in entry.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().clone().reshape(-1)
    return out


def grads_and_params(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Full gradients and parameters by the model's own names (collective)."""
    grads, params = {}, {}
    for name, p in model.named_parameters():
        key = name.replace("_checkpoint_wrapped_module.", "")
        assert p.grad is not None, name
        grads[key] = p.grad.full_tensor().detach().clone()
        params[key] = p.full_tensor().detach().clone()
    return grads, params


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    batch = build_batch(load_groups(spec["groups"]), "std")
    last_config = None
    for i, case in enumerate(spec["cases"]):
        config = LearnerConfig.model_validate(case["learner"])
        last_config = config
        model = fresh_model()
        trainer = DistributedTrainer(
            model, config, ctx, activation_checkpointing=bool(case.get("activation_checkpointing"))
        )
        trainer.single_pass = case.get("single_pass", True)
        stats = trainer.step(batch)
        # The broadcast's layout, from the shards' metadata, is what the gathered weights are.
        gathered = layout_of(full_weights(model, torch.bfloat16))
        assert weights_layout(model, torch.bfloat16) == gathered, "layout differs from weights"
        grads, params = grads_and_params(model)
        if ctx.rank == 0:
            where = out / case["name"]
            where.mkdir(parents=True, exist_ok=True)
            (where / "stats.json").write_text(json.dumps(stats))
            save_file(grads, str(where / "grads.safetensors"))
            save_file(params, str(where / "params.safetensors"))
        if i == len(spec["cases"]) - 1 and spec.get("save"):
            checkpointer = ShardedCheckpointer(
                Path(spec["save"]), model, trainer.optimizer, trainer.scheduler, keep_last=2
            )
            checkpointer.save(7, {"version": 7, "marker": "saved"})
            state = full_state(model, trainer.optimizer)
            if ctx.rank == 0:
                (out / "saved").mkdir(parents=True, exist_ok=True)
                save_file(state, str(out / "saved" / "state.safetensors"))
    if spec.get("load"):
        assert last_config is not None
        model = fresh_model()
        trainer = DistributedTrainer(model, last_config, ctx)
        checkpointer = ShardedCheckpointer(
            Path(spec["load"]), model, trainer.optimizer, trainer.scheduler, keep_last=2
        )
        restored = checkpointer.restore()
        assert restored is not None, "no checkpoint to restore"
        step, loop_state = restored
        state = full_state(model, trainer.optimizer)
        if ctx.rank == 0:
            (out / "loaded").mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / "loaded" / "state.safetensors"))
            lr = trainer.scheduler.get_last_lr()[0]
            (out / "loaded" / "loop.json").write_text(
                json.dumps({"step": step, "lr": lr, **loop_state})
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

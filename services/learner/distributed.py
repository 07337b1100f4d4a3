"""The learner over N processes (torchrun): FSDP2 shards, a step split across ranks, rank 0 in
charge.

Started as ``torchrun --nproc-per-node N [--nnodes M ...] -m services.cli learner CONFIG``, every
process builds the same model and shards it with ``fully_shard`` (one unit per decoder layer plus
the root) over a one-dimensional device mesh: fp32 master shards and optimiser state, compute in
``learner.compute_dtype`` through ``MixedPrecisionPolicy``, optional activation checkpointing.

Rank 0 alone runs the loop (Redis, gRPC, metrics, the publish) and tells the other ranks, over a
small Gloo control group, what to take part in next (:class:`Commands`): a step (its rollout
groups, as serialized protobufs), a weight gather, a checkpoint save or load, an evaluation, the
final model, stop. Non-zero ranks run :func:`follow` until told to stop.

The step (:class:`DistributedTrainer`) gives the same update as one process:
- every rank holds the whole step's batch (token ids and per-token scalars, small next to the
  model) and the same deterministic plan of which sequences each rank trains, per mini-batch,
  balanced by token count (:func:`plan_rows`);
- the statistics pass (the grad pass itself in a one-update step, a no-grad pass before several
  updates; see services.learner.trainer) computes each rank's rows; proximal log-probs, proxy
  log-probs and entropy are all-gathered into the step's (S, C) layout, so the off-policy
  weights, Lp-Reg's step-wide candidate ranking (``select_regularized``, the very function one
  process calls) and the metrics are computed on the same tensors by every rank; in a one-update
  step each rank then runs the regularised-token pass over its own rows;
- the loss of each rank's micro-batches uses the mini-batch's global token count as denominator
  and FSDP's gradient reduction sums (divide factor 1), so the reduced gradient is that of the
  whole mini-batch. Every rank runs the same number of forward/backward passes (FSDP's
  collectives pair up); a rank short of rows runs a zero-weight pass.
Lp-Reg's ``ranking: micro_batch`` (the reference's per-micro-batch ranking) depends on how
sequences are packed by definition, so with it N ranks pack, and rank, differently from one
process; the default ``ranking: step`` is what makes the update independent of N.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from lpreg_core.config import LearnerConfig, RunConfig
from lpreg_core.loss import ProxyFilter
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.learner.checkpoint import ShardedCheckpointer
from services.learner.trainer import (
    Selection,
    StepBatch,
    Trainer,
    _accumulate,
    _concat,
    _split,
    _step_record,
    build_batch,
    take_rows,
)

log = logging.getLogger("lpreg.learner.distributed")

# Prefix torch's checkpoint_wrapper puts in front of a wrapped layer's parameter names; weights
# leave the learner under the model's own names.
_WRAPPED = "_checkpoint_wrapped_module."


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """This process's place in the learner's process group."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh
    control: dist.ProcessGroup  # Gloo, for commands (small host-side messages)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> DistContext:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): NCCL on CUDA, Gloo on the CPU; one device per process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("learner.device=cuda but no CUDA device is visible to this process")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    control = dist.new_group(backend="gloo")
    assert control is not None
    return DistContext(dist.get_rank(), world, device, mesh, control)


def shard_model(
    model: PreTrainedModel,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
    activation_checkpointing: bool = False,
) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head); with
    activation checkpointing each layer recomputes its activations in backward. FSDP's
    reduce-scatter sums gradients (divide factor 1): each rank's loss already carries the global
    denominator."""
    policy = mp_policy or MixedPrecisionPolicy()
    decoder = getattr(model, str(model.base_model_prefix))
    layers = decoder.layers
    for i, layer in enumerate(list(layers)):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                checkpoint_wrapper,
            )

            layer = checkpoint_wrapper(layer)
            layers[i] = layer
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (Gloo has no PREMUL_SUM, which FSDP picks for a custom factor).
            module.set_force_sum_reduction_for_comms(True)


def plan_rows(lengths: list[int], minis: list[slice], world: int) -> list[list[list[int]]]:
    """Which rows each rank trains, per mini-batch: ``plan[m][rank]`` (sorted row indices).

    Longest sequence first to the rank with the fewest tokens so far (ties: fewer rows, lower
    rank); deterministic, so every rank computes the same plan without talking."""
    plan: list[list[list[int]]] = []
    for mini in minis:
        parts: list[list[int]] = [[] for _ in range(world)]
        load = [0] * world
        for row in sorted(range(mini.start, mini.stop), key=lambda r: (-lengths[r], r)):
            rank = min(range(world), key=lambda q: (load[q], len(parts[q]), q))
            parts[rank].append(row)
            load[rank] += lengths[row]
        plan.append([sorted(p) for p in parts])
    return plan


def _num_micro(plan: list[list[int]], size: int) -> int:
    """Micro-batches every rank runs for one part of the plan (the busiest rank's count)."""
    return max(math.ceil(len(rows) / size) for rows in plan)


class DistributedTrainer(Trainer):
    """``Trainer`` over an FSDP2-sharded model; ``step`` is collective (every rank calls it with
    the same batch) and returns the step's global metrics on every rank."""

    def __init__(
        self,
        model: PreTrainedModel,
        config: LearnerConfig,
        ctx: DistContext,
        compute_dtype: torch.dtype | None = None,
        mp_policy: MixedPrecisionPolicy | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        model.to(ctx.device)  # type: ignore[arg-type]
        shard_model(model, ctx.mesh, mp_policy, activation_checkpointing)
        super().__init__(model, config, device=ctx.device, compute_dtype=compute_dtype)
        self.ctx = ctx
        if self.loss_config.proxy_filter is not None and self.loss_config.step_ranking is None:
            log.warning(
                "Lp-Reg ranks candidates per micro-batch (loss.ranking=micro_batch): with %d "
                "ranks the micro-batches, so the candidates, differ from one process's; "
                "loss.ranking=step gives the same update on any number of ranks",
                ctx.world_size,
            )
        # The statistics pass reads the root's parameters (embeddings, norm, LM head) outside
        # model.forward: run it under the root's FSDP hooks.
        object.__setattr__(model, "lpreg_token_stats", self._owned_token_stats)
        register_fsdp_forward_method(model, "lpreg_token_stats")
        self.forward_stats = model.__dict__["lpreg_token_stats"]

    def _owned_token_stats(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``hidden_token_stats`` returning fresh tensors, not views: FSDP hooks the root's
        backward on the outputs, and an in-place op on a view would drop that hook."""
        out = self.hidden_token_stats(*args, **kwargs)
        return out[0].clone(), out[1].clone(), None if out[2] is None else out[2].clone()

    def _gather_rows(self, local: Tensor, plan: list[list[int]], num: int) -> Tensor:
        """(rows of this rank, ...) per rank -> (num, ...) in the step's row order."""
        most = max(len(rows) for rows in plan)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.ctx.world_size)]
        dist.all_gather(parts, padded)
        full = local.new_zeros((num, *local.shape[1:]))
        for part, rows in zip(parts, plan, strict=True):
            if rows:
                full[torch.tensor(rows, device=full.device)] = part[: len(rows)]
        return full

    def _gather_stats(
        self,
        parts: list[tuple[Tensor, Tensor, Tensor | None]],
        spare: tuple[Tensor, Tensor, Tensor | None] | None,
        plan: list[list[int]],
        num: int,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each rank's (log-probs, entropy, proxy) of its micro-batches -> the step's, on every
        rank (``spare``, a zero-weight pass's, gives the layout to a rank without rows)."""
        if parts:
            stats = _concat(parts)
        else:
            assert spare is not None
            stats = (spare[0][:0], spare[1][:0], None if spare[2] is None else spare[2][:0])
        local = torch.stack([t for t in stats if t is not None], dim=1)
        full = self._gather_rows(local, plan, num)
        return full[:, 0], full[:, 1], None if stats[2] is None else full[:, 2]

    def _filler_pass(
        self, filler: StepBatch, proxy: ProxyFilter | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
        """A zero-weight pass (the same collectives as a real micro-batch, no gradient): its
        loss and its statistics."""
        log_probs, ent, proxy_log_probs = self._token_stats(filler, slice(0, 1), proxy)
        return log_probs.sum() * 0.0 + ent.sum() * 0.0, (
            log_probs.detach(),
            ent.detach(),
            proxy_log_probs,
        )

    @staticmethod
    def _micro_slices(num_rows: int, num_micro: int, size: int) -> Iterator[slice]:
        """``num_micro`` micro-batches of ``size`` over ``num_rows`` rows; empty slices past the
        rows stand for the zero-weight passes of a rank short of rows."""
        for i in range(num_micro):
            yield slice(i * size, max(i * size, min(num_rows, (i + 1) * size)))

    def _apply_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.optimizer.grad_clip
        )
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def step(self, batch: StepBatch) -> dict[str, float]:
        batch = batch.to(self.device)
        self.model.eval()
        if self.single_pass and self.config.updates_per_step == 1:
            return self._single_pass_step(batch)
        num = len(batch.sequences)
        rank, world = self.ctx.rank, self.ctx.world_size
        minis = _split(num, self.config.num_mini_batches)
        plan = plan_rows([len(s) for s in batch.sequences], minis, world)
        # The step's rows of each rank (mini-batch by mini-batch) for the no-grad pass.
        step_plan = [[r for part in plan for r in part[q]] for q in range(world)]
        mine = take_rows(batch, step_plan[rank])
        filler = take_rows(batch, [0])  # the zero-weight pass of a rank short of rows
        size = self.config.micro_batch_sequences
        proxy_filter = self.loss_config.proxy_filter
        with torch.no_grad():
            parts = [
                self._token_stats(mine, rows, proxy_filter)
                for rows in self._micro_batches(len(step_plan[rank]))
            ]
            spare = None
            for _ in range(_num_micro(step_plan, size) - len(parts)):
                spare = self._token_stats(filler, slice(0, 1), proxy_filter)
        proximal, entropy, proxy = self._gather_stats(parts, spare, step_plan, num)
        sel, totals = self._select(batch, proximal, proxy)
        lr = float(self.scheduler.get_last_lr()[0])
        updates = [
            self._sharded_update(batch, mini, part, filler, sel)
            for _epoch in range(self.config.update_epochs)
            for mini, part in zip(minis, plan, strict=True)
        ]
        return _step_record(batch, entropy, sel, totals, updates, lr)

    def _single_pass_step(self, batch: StepBatch) -> dict[str, float]:
        """Trainer._single_pass_step over the ranks: each rank's rows forward with grad, the
        statistics all-gathered for the step-wide selection, each rank's regularised rows
        pulled; every rank runs the same number of passes (zero-weight ones when short)."""
        num = len(batch.sequences)
        rank, world = self.ctx.rank, self.ctx.world_size
        [plan] = plan_rows([len(s) for s in batch.sequences], [slice(0, num)], world)
        mine = take_rows(batch, plan[rank])
        filler = take_rows(batch, [0])
        size = self.config.micro_batch_sequences
        proxy_filter = self.loss_config.proxy_filter
        lr = float(self.scheduler.get_last_lr()[0])
        provisional = self._num_tokens(batch.mask)
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[tuple[Tensor, Tensor, Tensor | None]] = []
        spare = None
        for micro in self._micro_slices(len(plan[rank]), _num_micro(plan, size), size):
            if micro.stop > micro.start:
                log_probs, ent, proxy = self._token_stats(mine, micro, proxy_filter)
                loss = self._provisional_loss(mine, micro, log_probs, ent, proxy, provisional)
                parts.append((log_probs.detach(), ent.detach(), proxy))
            else:
                loss, spare = self._filler_pass(filler, proxy_filter)
            loss.backward()
        proximal, entropy, proxy = self._gather_stats(parts, spare, plan, num)
        sel, totals = self._select(batch, proximal, proxy)
        num_tokens = self._num_tokens(sel.mask)
        self._renormalise_gradients(provisional, num_tokens)
        index = torch.tensor(plan[rank], dtype=torch.long, device=self.device)
        sums = self._recorded_metrics(
            self._micro_batches(len(plan[rank])), entropy[index], sel[index], num_tokens
        )
        coefficients = self._pull_coefficients(entropy, sel, num_tokens)
        if coefficients is not None:
            held = coefficients.ne(0).any(-1).tolist()
            pulled = [[r for r in rows if held[r]] for rows in plan]
            sub = take_rows(batch, pulled[rank])
            sub_coefficients = coefficients[pulled[rank]]
            for micro in self._micro_slices(len(pulled[rank]), _num_micro(pulled, size), size):
                if micro.stop > micro.start:
                    loss = self._pull_loss(sub, micro, sub_coefficients)
                else:
                    loss, _ = self._filler_pass(filler)
                loss.backward()
        update = self._sum_over_ranks(sums)
        update["grad_norm"] = self._apply_gradients()
        return _step_record(batch, entropy, sel, totals, [update], lr)

    def _sharded_update(
        self,
        batch: StepBatch,
        mini: slice,
        plan: list[list[int]],
        filler: StepBatch,
        sel: Selection,
    ) -> dict[str, float]:
        """One optimiser update on this rank's rows of ``mini``; the denominator is the whole
        mini-batch's, the metrics are summed over ranks."""
        num_tokens = self._num_tokens(sel.mask[mini])
        rows = plan[self.ctx.rank]
        mine = take_rows(batch, rows)
        local = sel[torch.tensor(rows, dtype=torch.long, device=self.device)]
        size = self.config.micro_batch_sequences
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for at in self._micro_slices(len(rows), _num_micro(plan, size), size):
            if at.stop > at.start:
                log_probs, ent, _ = self._token_stats(mine, at, None)
                loss, metrics = self._micro_loss(log_probs, ent, local[at], num_tokens)
                _accumulate(sums, loss, metrics)
            else:
                loss, _ = self._filler_pass(filler)
            loss.backward()
        totals = self._sum_over_ranks(sums)
        totals["grad_norm"] = self._apply_gradients()
        return totals

    def _sum_over_ranks(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Per-rank metric sums -> global sums. A rank with only zero-weight passes has no
        metric keys, so the names travel first (small, over the control group)."""
        names: list[list[str]] = [[] for _ in range(self.ctx.world_size)]
        dist.all_gather_object(names, sorted(sums), group=self.ctx.control)
        keys = sorted({k for part in names for k in part})
        values = torch.tensor(
            [float(sums[k]) if k in sums else 0.0 for k in keys], dtype=torch.float64
        )
        dist.all_reduce(values, group=self.ctx.control)
        return dict(zip(keys, values.tolist(), strict=True))


def full_weights(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor, in ``dtype`` if given) of each parameter, gathered from the shards one
    at a time: collective, every rank iterates it to the end; only rank 0 needs the tensors."""
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        yield (
            name.replace(_WRAPPED, ""),
            full.detach() if dtype is None else full.detach().to(dtype),
        )


def weights_layout(
    model: torch.nn.Module, dtype: torch.dtype
) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, full shape, ``dtype``) of what :func:`full_weights` yields, from the parameters'
    metadata alone (a sharded parameter reports its full shape): no gather, no collective."""
    return [(name.replace(_WRAPPED, ""), p.shape, dtype) for name, p in model.named_parameters()]


# Commands rank 0 sends to the other ranks, who then take part in the matching collective.
STEP, WEIGHTS, SAVE, RESTORE, EVALUATE, FINAL_MODEL, STOP = (
    "step",
    "weights",
    "save",
    "restore",
    "evaluate",
    "final_model",
    "stop",
)


class Commands:
    """Rank 0 -> other ranks: one JSON message at a time over the Gloo control group."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def _broadcast(self, payload: bytes | None) -> bytes:
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long)
        dist.broadcast(size, src=0, group=self.ctx.control)
        data = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if payload is not None
            else torch.empty(int(size), dtype=torch.uint8)
        )
        dist.broadcast(data, src=0, group=self.ctx.control)
        return bytes(data.numpy().tobytes())

    def send(self, op: str, **fields: Any) -> None:
        assert self.ctx.is_main, "only rank 0 gives commands"
        self._broadcast(json.dumps({"op": op, **fields}).encode())

    def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self._broadcast(None))
        return message


def encode_groups(groups: list[rollout_pb2.RolloutGroup]) -> list[str]:
    return [base64.b64encode(g.SerializeToString()).decode() for g in groups]


def decode_groups(encoded: list[str]) -> list[rollout_pb2.RolloutGroup]:
    return [rollout_pb2.RolloutGroup.FromString(base64.b64decode(e)) for e in encoded]


class LeadingTrainer:
    """Rank 0's ``PolicyTrainer``: sends the step's groups to the other ranks, then steps."""

    def __init__(
        self, trainer: DistributedTrainer, commands: Commands, advantage_mode: str
    ) -> None:
        self.trainer = trainer
        self.commands = commands
        self.advantage_mode = advantage_mode

    def train_step(self, groups: list[rollout_pb2.RolloutGroup]) -> dict[str, float]:
        self.commands.send(STEP, groups=encode_groups(groups))
        return self.trainer.step(build_batch(groups, self.advantage_mode))


def leading_weights(
    model: torch.nn.Module, commands: Commands, dtype: torch.dtype
) -> Callable[[], Iterator[tuple[str, Tensor]]]:
    """Rank 0's ``weights()`` for the publisher: tells the other ranks to gather, then yields
    each full tensor as it is gathered. A publish that stops early still finishes the gathers
    (the other ranks are in them)."""

    def weights() -> Iterator[tuple[str, Tensor]]:
        commands.send(WEIGHTS)
        gathered = full_weights(model, dtype)
        try:
            yield from gathered
        finally:
            for _ in gathered:
                pass

    return weights


def follow(
    commands: Commands,
    trainer: DistributedTrainer,
    advantage_mode: str,
    handlers: dict[str, Callable[[dict[str, Any]], object]],
) -> None:
    """A non-zero rank's loop: take part in what rank 0 does until it says stop. ``handlers``
    covers the commands beyond a step and a weight gather (checkpoints, evaluation, final
    model); one rank 0 sends and no handler is given for is an error."""
    while True:
        message = commands.receive()
        op = message["op"]
        if op == STOP:
            return
        if op == STEP:
            trainer.step(build_batch(decode_groups(message["groups"]), advantage_mode))
        elif op == WEIGHTS:
            for _ in full_weights(trainer.model):
                pass
        elif op in handlers:
            handlers[op](message)
        else:
            raise RuntimeError(f"rank {commands.ctx.rank}: unknown learner command {op!r}")


class Sharded:
    """What the learner's composition root swaps in under torchrun (WORLD_SIZE > 1): the
    sharded trainer, rank 0's trainer, weights and checkpointer that bring the other ranks
    along, the collective final-model save, and the other ranks' loop (:meth:`follow`)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.commands = Commands(ctx)

    @classmethod
    def from_env(cls, config: RunConfig) -> Sharded | None:
        """The process group when started by torchrun with more than one rank, else None (one
        plain process, exactly as without torchrun)."""
        if world_size_from_env() <= 1:
            return None
        ctx = init_distributed(config.learner.device)
        log.info("learner rank %d of %d on %s", ctx.rank, ctx.world_size, ctx.device)
        return cls(ctx)

    def trainer(
        self, model: PreTrainedModel, config: LearnerConfig, compute: torch.dtype
    ) -> DistributedTrainer:
        """fp32 master shards (the model's dtype), forward/backward in ``compute``, gradients
        reduced in the master dtype."""
        master = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=master)
        return DistributedTrainer(
            model,
            config,
            self.ctx,
            compute_dtype=compute,
            mp_policy=policy,
            activation_checkpointing=config.activation_checkpointing,
        )

    def policy_trainer(self, trainer: Trainer, advantage_mode: str) -> LeadingTrainer:
        assert isinstance(trainer, DistributedTrainer), "built by Sharded.trainer"
        return LeadingTrainer(trainer, self.commands, advantage_mode)

    def weights(
        self, model: torch.nn.Module, dtype: torch.dtype
    ) -> Callable[[], Iterator[tuple[str, Tensor]]]:
        return leading_weights(model, self.commands, dtype)

    def checkpointer(self, root: Path, trainer: Trainer, keep_last: int) -> ShardedCheckpointer:
        return ShardedCheckpointer(
            root,
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
            keep_last,
            announce=self.commands.send if self.ctx.is_main else None,
        )

    def before_evaluate(self) -> None:
        self.commands.send(EVALUATE)

    def save_final_model(self, model: torch.nn.Module, model_path: str, out: Path) -> None:
        """Collective: the full weights gathered onto rank 0's CPU, written there as a Hugging
        Face directory with the starting model's tokenizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )
        from transformers import AutoTokenizer

        if self.ctx.is_main:
            self.commands.send(FINAL_MODEL)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if not self.ctx.is_main:
            return
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)  # type: ignore[operator]
        AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    def stop(self) -> None:
        """Rank 0: release the other ranks; every rank: leave the process group."""
        if self.ctx.is_main:
            self.commands.send(STOP)
        dist.destroy_process_group()

    def follow(self, config: RunConfig) -> None:
        """A non-zero rank: the same model, trainer and checkpointer as rank 0, driven by its
        commands; signals are left to rank 0 (it drains the step the other ranks take part in)."""
        from transformers import AutoModelForCausalLM

        from lpreg_core.data import make_source
        from lpreg_core.devices import compute_dtype
        from lpreg_core.weights import dtype_from_name
        from services.learner.evaluate import greedy_accuracy

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        torch.set_num_threads(config.learner.num_threads)
        torch.manual_seed(config.learner.seed)
        master = dtype_from_name(config.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=master)
        trainer = self.trainer(
            model, config.learner, compute_dtype(config.learner, master, self.ctx.device)
        )
        run_dir = Path(config.local.run_dir.format(run_id=config.run_id))
        checkpointer = self.checkpointer(
            run_dir / "checkpoints", trainer, config.learner.checkpoint.keep_last
        )
        problems = make_source(config.task).eval_problems(config.learner.eval_prompts)
        handlers: dict[str, Callable[[dict[str, Any]], object]] = {
            SAVE: lambda m: checkpointer.save_collective(int(m["step"]), m["state"]),
            RESTORE: lambda m: m["path"] and checkpointer.load_collective(Path(m["path"])),
            EVALUATE: lambda m: greedy_accuracy(model, config, problems),
            FINAL_MODEL: lambda m: self.save_final_model(model, config.model.path, Path()),
        }
        try:
            follow(self.commands, trainer, config.learner.advantage_mode, handlers)
        finally:
            dist.destroy_process_group()

"""Learner checkpoints: safetensors for tensors, JSON for the rest; never pickle.

Layout of one checkpoint (written to a temporary directory, fsynced, then renamed into place):
    step_00000010/model.safetensors       model state dict
    step_00000010/optimizer.safetensors   optimiser tensor state, keys "<param index>.<name>"
    step_00000010/optimizer.json          optimiser param groups and scalar state
    step_00000010/rng.safetensors         torch RNG state
    step_00000010/state.json              trainer state: step, version, data position, counters,
                                          scheduler, Python RNG
`latest` (a text file, replaced atomically) names the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_split(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Tied weights share storage: save each storage once under its first name.
    model_state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(model_state, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", opt_meta)
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    full_state = {
        **state,
        "step": step,
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
    }
    _write_json(tmp / "state.json", full_state)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    with open(pointer, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and RNGs in place; returns the trainer state."""
    missing, unexpected = model.load_state_dict(
        load_file(str(path / "model.safetensors")), strict=False
    )
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing={missing} unexpected={unexpected}"
        )
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), meta))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    py_rng = state.pop("python_rng")
    random.setstate((py_rng[0], tuple(py_rng[1]), py_rng[2]))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return state


class FileCheckpointer:
    """The loop's ``Checkpointer`` over this module's files: model, optimiser, scheduler and
    RNGs of the objects given here, plus the loop's state, under ``root``."""

    def __init__(
        self,
        root: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        keep_last: int,
    ) -> None:
        self.root = root
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.keep_last = keep_last

    def save(self, step: int, state: dict[str, Any]) -> None:
        save_checkpoint(
            self.root, step, self.model, self.optimizer, self.scheduler, state, self.keep_last
        )

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        path = latest_checkpoint(self.root)
        if path is None:
            return None
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        return int(state.pop("step")), state


SHARDED_MARKER = ".metadata"  # torch.distributed.checkpoint's index file


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint directory was written by ``ShardedCheckpointer``."""
    return (path / SHARDED_MARKER).is_file()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it "assumes" one process whenever there is no process group: here one
    process is the intent (a plain learner reading or writing the sharded format)."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


class ShardedCheckpointer:
    """The loop's ``Checkpointer`` over torch.distributed.checkpoint (DCP): model and optimiser
    as shards (each rank writes its own; a load reshards onto any number of ranks, one plain
    process included), scheduler, RNGs and the loop's state as JSON written by rank 0.

    Layout: the same ``step_XXXXXXXX`` directories and ``latest`` pointer as the file format, a
    directory holding DCP's ``.metadata`` and ``__<rank>_0.distcp`` files plus ``state.json``.
    ``save`` and ``restore`` are collective: on rank 0 ``announce(op, **fields)`` first tells the
    other ranks to call ``save_collective`` / ``load_collective`` with the same arguments (a
    shared filesystem under ``root`` is assumed, as DCP does). In a plain process (no process
    group) it reads and writes the same format alone.
    """

    def __init__(
        self,
        root: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        keep_last: int,
        announce: Any = None,
    ) -> None:
        self.root = root
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.keep_last = keep_last
        self.announce = announce
        self.rank = torch.distributed.get_rank() if _distributed() else 0

    def _state_dicts(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.announce is not None:
            self.announce("save", step=step, state=state)
        self.save_collective(step, state)

    def save_collective(self, step: int, state: dict[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp

        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        with _one_process_quietly():
            dcp.save(self._state_dicts(), checkpoint_id=str(tmp), no_dist=not _distributed())
        _barrier()  # every rank's shards are written before rank 0 moves them into place
        if self.rank == 0:
            _write_json(
                tmp / "state.json",
                {
                    **state,
                    "step": step,
                    "scheduler": self.scheduler.state_dict(),
                    "python_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state().tolist(),
                },
            )
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            with open(pointer, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(pointer, self.root / LATEST)
            _fsync_dir(self.root)
            for old in sorted(p for p in self.root.glob("step_*") if p.is_dir())[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        path = latest_checkpoint(self.root)
        if self.announce is not None:
            self.announce("restore", path=None if path is None else str(path))
        if path is None:
            return None
        state = self.load_collective(path)
        return int(state.pop("step")), state

    def load_collective(self, path: Path) -> dict[str, Any]:
        """Restore model, optimiser, scheduler and RNGs from ``path``; returns the loop state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not is_sharded(path):
            raise ValueError(
                f"checkpoint {path} is not sharded (no {SHARDED_MARKER}); a learner under "
                "torchrun resumes only from checkpoints written by ShardedCheckpointer"
            )
        sd = self._state_dicts()
        with _one_process_quietly():
            dcp.load(sd, checkpoint_id=str(path), no_dist=not _distributed())
        set_state_dict(
            self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )
        state = json.loads((path / "state.json").read_text())
        self.scheduler.load_state_dict(state.pop("scheduler"))
        py_rng = state.pop("python_rng")
        random.setstate((py_rng[0], tuple(py_rng[1]), py_rng[2]))
        torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
        return state

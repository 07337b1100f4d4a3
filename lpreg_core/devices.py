"""Device and dtype resolution from the config's ``auto`` settings (one place for the rules).

The learner keeps fp32 master weights and optimiser state on its device and computes in
``learner.compute_dtype`` under autocast; generators serve in ``generator.dtype``; weights travel
in ``broadcast.wire_dtype``. CUDA availability is only queried here, never assumed.
"""

from __future__ import annotations

import torch

from lpreg_core.config import BroadcastConfig, LearnerConfig
from lpreg_core.weights import dtype_from_name


def resolve_device(setting: str, field: str = "learner.device") -> torch.device:
    """A device setting (``field`` names it in errors): auto = the current CUDA device when
    there is one, else the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}=cuda but no CUDA device is visible to this process")
        return torch.device("cuda", torch.cuda.current_device())
    if setting == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device setting {setting!r} (expected auto, cuda or cpu)")


def compute_dtype(config: LearnerConfig, master: torch.dtype, device: torch.device) -> torch.dtype:
    """``learner.compute_dtype``: auto = bfloat16 on CUDA, the master dtype on CPU."""
    if config.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else master
    return dtype_from_name(config.compute_dtype)


def wire_dtype(config: BroadcastConfig, compute: torch.dtype) -> torch.dtype:
    """``broadcast.wire_dtype``: auto = the learner's compute dtype."""
    return compute if config.wire_dtype == "auto" else dtype_from_name(config.wire_dtype)


def serving_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``generator.dtype``: auto = bfloat16 on CUDA, float32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(setting)

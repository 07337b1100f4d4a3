"""Device and dtype resolution, and the start-up refusal of settings that cannot work."""

from __future__ import annotations

import pytest
import torch

from lpreg_core.config import BroadcastConfig, LearnerConfig, RunConfig
from lpreg_core.devices import compute_dtype, resolve_device, serving_dtype, wire_dtype


def test_auto_picks_cuda_only_when_there_is_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_asking_for_cuda_without_one_names_the_field() -> None:
    with pytest.raises(ValueError, match="learner.device=cuda"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="generator.backend.device=cuda"):
        resolve_device("cuda", field="generator.backend.device")


def test_compute_wire_and_serving_dtypes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto = LearnerConfig()
    assert compute_dtype(auto, torch.float32, cuda) == torch.bfloat16
    assert compute_dtype(auto, torch.float32, cpu) == torch.float32
    assert compute_dtype(auto, torch.float64, cpu) == torch.float64
    bf16 = LearnerConfig(compute_dtype="bfloat16")
    assert compute_dtype(bf16, torch.float32, cpu) == torch.bfloat16
    assert wire_dtype(BroadcastConfig(), torch.bfloat16) == torch.bfloat16
    assert wire_dtype(BroadcastConfig(wire_dtype="float32"), torch.bfloat16) == torch.float32
    assert serving_dtype("auto", cuda) == torch.bfloat16
    assert serving_dtype("auto", cpu) == torch.float32
    assert serving_dtype("float16", cpu) == torch.float16


def test_half_precision_master_weights_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"model\.dtype=bfloat16.*learner\.compute_dtype"):
        RunConfig.model_validate({"model": {"dtype": "bfloat16"}})


def test_nccl_with_a_cpu_learner_is_refused_naming_both_fields() -> None:
    with pytest.raises(ValueError, match=r"broadcast\.backend=nccl.*learner\.device=cpu"):
        RunConfig.model_validate({"broadcast": {"backend": "nccl"}, "learner": {"device": "cpu"}})
    # With device auto the learner resolves at start-up (a GPU machine passes).
    RunConfig.model_validate({"broadcast": {"backend": "nccl"}, "learner": {"device": "auto"}})

"""Broadcast settings that cannot work are refused before anything connects, naming the settings:
NCCL needs CUDA memory on the learner (``learner.device``) and on every generator (its backend's
device), and an NCCL group receives only into CUDA memory."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from lpreg_core.config import BroadcastConfig
from services.weight_sync import (
    BroadcastFailed,
    WeightReceiver,
    WeightSender,
    check_member_backend,
    check_receive_target,
    resolve_backend,
)


def test_learner_side_nccl_on_a_cpu_learner_names_both_settings() -> None:
    with pytest.raises(ValueError, match=r"broadcast\.backend=nccl .* learner\.device is cpu"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"broadcast\.backend=nccl .* learner\.device is cpu"):
        WeightSender(BroadcastConfig(backend="nccl", store_port=0), "cpu")


def test_learner_side_backends_resolve_by_device() -> None:
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    assert resolve_backend("nccl", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match=r"broadcast\.backend='mpi' is not a backend"):
        resolve_backend("mpi", "cpu")


def test_a_cpu_generator_facing_nccl_is_refused_naming_the_setting_and_its_device() -> None:
    with pytest.raises(
        ValueError, match=r"broadcast\.backend=nccl .* the generator's device \(cpu\)"
    ):
        check_member_backend("nccl", "auto", torch.device("cpu"))
    # auto means NCCL when the learner is configured onto a GPU.
    with pytest.raises(
        ValueError,
        match=r"broadcast\.backend=auto with learner\.device=cuda .* the generator's device \(cpu\)",
    ):
        check_member_backend("auto", "cuda", "cpu")


@pytest.mark.parametrize(
    ("config_backend", "learner_device", "member_device", "expected"),
    [
        ("auto", "cpu", "cpu", "gloo"),
        ("auto", "auto", "cpu", "auto"),  # only the learner's machine can tell
        ("gloo", "cuda", "cpu", "gloo"),
        ("auto", "cuda", "cuda:0", "nccl"),
        ("nccl", "cuda", "cuda:0", "nccl"),
        ("gloo", "cuda", "cuda:0", "gloo"),
    ],
)
def test_consistent_generator_settings_pass(
    config_backend: str, learner_device: str, member_device: str, expected: str
) -> None:
    assert check_member_backend(config_backend, learner_device, member_device) == expected


def test_an_nccl_group_refuses_a_cpu_receive_target() -> None:
    with pytest.raises(
        ValueError, match=r"NCCL broadcast group receives into CUDA memory, not cpu"
    ):
        check_receive_target("nccl", "cpu")
    assert check_receive_target("nccl", "cuda:1") == torch.device("cuda", 1)
    assert check_receive_target("gloo", "cpu") == torch.device("cpu")


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_joining_an_nccl_group_with_a_cpu_target_fails_before_contacting_the_learner() -> None:
    port = _unused_port()
    with WeightReceiver() as receiver:
        start = time.monotonic()
        with pytest.raises(ValueError, match="receives into CUDA memory, not cpu"):
            receiver.join(1, 1, 2, "127.0.0.1", port, "nccl", timeout_s=5.0, device="cpu")
        # Not the store's connection timeout: nothing was dialled.
        assert time.monotonic() - start < 5.0
        assert receiver.epoch is None
        # The same join over Gloo does dial the (absent) learner.
        with pytest.raises(BroadcastFailed, match="cannot reach"):
            receiver.join(
                1, 1, 2, "127.0.0.1", port, "gloo", timeout_s=0.5, device="cpu", secret=bytes(32)
            )

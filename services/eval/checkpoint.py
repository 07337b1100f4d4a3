"""Turn ``--checkpoint DIR`` into a Hugging Face model directory a generator backend can load.

Accepted:
- a Hugging Face model directory (``config.json`` beside the weights), e.g. runs/tiny/final_model;
- a learner checkpoint (services/learner/checkpoint.py): one ``step_*`` directory holding
  ``model.safetensors`` and ``state.json``, a checkpoints root with a ``latest`` pointer, or a
  run directory whose ``checkpoints/`` has one. A learner checkpoint holds only the state dict, so
  the architecture and tokenizer come from the config's ``model.path`` (the model it was trained
  from); the weights are written with them into a temporary directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["find_learner_checkpoint", "materialize_checkpoint"]

# Files of a model directory that carry weights; everything else (tokenizer, generation config)
# is copied from the base model next to a learner checkpoint's weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_step_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "state.json").is_file()


def find_learner_checkpoint(path: Path) -> Path | None:
    """The learner checkpoint ``path`` names (a step dir, a checkpoints root, a run dir)."""
    from services.learner.checkpoint import latest_checkpoint

    if _is_step_dir(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None and _is_step_dir(found):
            return found
    return None


@contextmanager
def materialize_checkpoint(checkpoint: str | Path, base_model: str, dtype: str) -> Iterator[Path]:
    """A Hugging Face model directory for ``checkpoint``, valid inside the ``with`` block."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_hf_dir(path):
        yield path
        return
    step_dir = find_learner_checkpoint(path)
    if step_dir is None:
        raise ValueError(
            f"{path} is neither a Hugging Face model directory (no config.json) nor a learner "
            "checkpoint (step_*/model.safetensors + state.json, or a `latest` pointer)"
        )
    base = Path(base_model)
    if not _is_hf_dir(base):
        raise ValueError(
            f"learner checkpoint {step_dir} needs the base model's config and tokenizer: "
            f"model.path={base} is not a Hugging Face model directory"
        )
    with tempfile.TemporaryDirectory(prefix="lpreg-eval-") as tmp:
        out = Path(tmp)
        _write_model_dir(step_dir, base, dtype, out)
        yield out


def _write_model_dir(step_dir: Path, base: Path, dtype: str, out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lpreg_core.weights import dtype_from_name

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype_from_name(dtype))
    missing, unexpected = model.load_state_dict(
        load_file(str(step_dir / "model.safetensors")), strict=False
    )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    bad_missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if unexpected or bad_missing:
        raise ValueError(
            f"checkpoint {step_dir} does not match the model at {base}: "
            f"missing={bad_missing} unexpected={unexpected}"
        )
    for item in base.iterdir():
        weights = item.name.endswith(_WEIGHT_SUFFIXES) or item.name in _WEIGHT_INDEXES
        if item.is_file() and not weights:
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out, safe_serialization=True)

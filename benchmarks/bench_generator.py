"""Sampling throughput of the generator backends; prints one JSON object.

Three ways to sample the same completions (same model, prompts, n, temperature, length limit):

- ``project_vllm``: the project's ``vllm`` backend (``VLLMBackend.generate``: AsyncLLM on its own
  event loop, log-probs, per-token versions, conversion to ``SampledCompletion``);
- ``bare_vllm``: ``vllm.LLM.generate`` with the same engine arguments and the same
  ``SamplingParams``, nothing around it;
- ``hf``: the project's ``hf`` backend (plain transformers decode loop).

Throughput is generated tokens per second of wall time, median over ``--repeats`` rounds; the
rounds interleave the backends so that a change in machine load hits all of them alike.
``overhead_ratio`` = project_vllm / bare_vllm (1.0 = no overhead; the goal is >= 0.9).

    python benchmarks/bench_generator.py [--model examples/tiny/model] [--quick]
    python benchmarks/bench_generator.py --model examples/smollm2/model --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# vLLM logs to stdout by default; stdout is for the JSON report only.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

import torch  # noqa: E402

from lpreg_core.config import HFBackendConfig, ModelConfig, VLLMBackendConfig  # noqa: E402
from lpreg_core.tasks.arithmetic import make_problems  # noqa: E402
from services.generator.backends.base import SampledCompletion, SampleRequest  # noqa: E402

DEFAULT_MODEL = ROOT / "examples" / "tiny" / "model"
GIB_BYTES = 1 << 30


def count_tokens(results: list[list[SampledCompletion]]) -> int:
    return sum(len(c.token_ids) for completions in results for c in completions)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summarise(runs: list[tuple[float, int]]) -> dict[str, Any]:
    rates = [tokens / seconds for seconds, tokens in runs]
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "runs_tokens_per_s": [round(r, 1) for r in rates],
        "tokens_per_run": [tokens for _, tokens in runs],
        "seconds_per_run": [round(s, 3) for s, _ in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=128, help="prompts per round")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per backend")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="vLLM scheduler batch")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the hf backend")
    parser.add_argument(
        "--quick", action="store_true", help="16 prompts x 4 samples x 16 tokens, 3 rounds"
    )
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.n, args.max_new_tokens, args.repeats = 16, 4, 16, 3

    torch.set_num_threads(args.threads)
    model = ModelConfig(path=str(args.model), dtype=args.dtype)
    vllm_config = VLLMBackendConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len
    )
    # Imported after torch's thread count is set: the backend derives OMP_NUM_THREADS from it
    # and must prepare the environment before vllm is imported.
    from services.generator.backends.hf import HFBackend
    from services.generator.backends.vllm import VLLMBackend

    project = VLLMBackend(vllm_config, model, seed=0)
    texts = [p.prompt for p in make_problems("eval", args.prompts, seed=0)]
    requests = [
        SampleRequest(project.tokenize(t), args.n, args.temperature, args.max_new_tokens)
        for t in texts
    ]

    import vllm
    from vllm import LLM
    from vllm.inputs import tokens_input
    from vllm.platforms import current_platform

    bare = LLM(
        model=str(args.model),
        dtype=args.dtype,
        seed=0,
        enforce_eager=vllm_config.enforce_eager,
        max_num_seqs=vllm_config.max_num_seqs,
        max_model_len=vllm_config.max_model_len,
        kv_cache_memory_bytes=(
            vllm_config.cpu_kvcache_space_gib * GIB_BYTES if current_platform.is_cpu() else None
        ),
        logprobs_mode="processed_logprobs",
        skip_tokenizer_init=True,
        generation_config="vllm",
        disable_log_stats=True,
    )
    bare_prompts = [tokens_input(r.prompt_token_ids) for r in requests]
    bare_params = [project.sampling_params(r) for r in requests]

    def run_bare() -> int:
        outputs = bare.generate(bare_prompts, bare_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)

    hf = (
        None if args.skip_hf else HFBackend(HFBackendConfig(max_batch_sequences=256), model, seed=0)
    )

    # Warm-up: first log-prob request compiles kernels, first batch sizes buffers.
    project.generate(requests[:4])
    bare.generate(bare_prompts[:4], bare_params[:4], use_tqdm=False)
    if hf is not None:
        hf.generate(requests[:4])

    runs: dict[str, list[tuple[float, int]]] = {"project_vllm": [], "bare_vllm": [], "hf": []}
    for _ in range(args.repeats):
        seconds, results = timed(lambda: project.generate(requests))
        runs["project_vllm"].append((seconds, count_tokens(results)))
        seconds, tokens = timed(run_bare)
        runs["bare_vllm"].append((seconds, tokens))
        if hf is not None:
            seconds, results = timed(lambda: hf.generate(requests))
            runs["hf"].append((seconds, count_tokens(results)))
    project.close()
    # LLM has no close(); its engine processes would otherwise outlive the report.
    bare.llm_engine.engine_core.shutdown()

    report: dict[str, Any] = {
        "benchmark": "generator_throughput",
        "model": str(args.model),
        "dtype": args.dtype,
        "device": current_platform.device_type,
        "vllm_version": vllm.__version__,
        "num_prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "threads": args.threads,
        "max_num_seqs": args.max_num_seqs,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "project_vllm": summarise(runs["project_vllm"]),
        "bare_vllm": summarise(runs["bare_vllm"]),
    }
    project_rate = report["project_vllm"]["tokens_per_s"]
    report["overhead_ratio"] = round(project_rate / report["bare_vllm"]["tokens_per_s"], 3)
    if hf is not None:
        report["hf"] = summarise(runs["hf"])
        report["project_vllm_vs_hf"] = round(project_rate / report["hf"]["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

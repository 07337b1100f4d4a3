"""max_staleness 0 is exactly synchronous training: the learner loop (admission, collection,
publishing) gives the same per-step losses as a plain sample-then-train loop with the same seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from test_generator_loop import FakeControl
from test_learner_loop import FakeClock, MemoryCheckpointer
from transformers import AutoModelForCausalLM

from lpreg_core.config import RunConfig
from lpreg_core.data import make_source
from lpreg_core.weight_sync import PublishResult
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.generator.backends.hf import HFBackend
from services.generator.loop import GeneratorLoop
from services.generator.metrics import GeneratorMetrics
from services.learner.loop import LearnerLoop
from services.learner.main import BatchTrainer
from services.learner.metrics import LearnerMetrics
from services.learner.registry import GeneratorRegistry
from services.learner.trainer import Trainer, build_batch
from services.transport import InMemoryStreams

MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"
STEPS = 3
B = 2
# Figures of each step compared between the two loops (as the loop records them, 6 digits).
COMPARED = ("loss", "grad_norm", "entropy", "reward_mean", "num_tokens")


def config() -> RunConfig:
    return RunConfig.model_validate(
        {
            "run_id": "sync",
            "model": {"path": str(MODEL)},
            "sampling": {"num_samples": 4, "max_new_tokens": 6},
            "learner": {
                "prompts_per_step": B,
                "max_staleness": 0,
                "steps": STEPS,
                "min_generators": 0,
                "eval_every_steps": 0,
                "optimizer": {"lr": 1e-3, "warmup_steps": 0},
                "checkpoint": {"every_steps": 100},
            },
            "redis": {"block_ms": 1},
        }
    )


def make_trainer(cfg: RunConfig) -> Trainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    return Trainer(model, cfg.learner)


def make_sampler(cfg: RunConfig, transport: InMemoryStreams) -> GeneratorLoop:
    backend = HFBackend(cfg.generator.backend, cfg.model, seed=123)  # type: ignore[arg-type]
    return GeneratorLoop(
        cfg,
        "gen-0",
        backend=backend,
        transport=transport,
        control=FakeControl([]),
        metrics=GeneratorMetrics(CollectorRegistry(), cfg.run_id),
    )


class CopyingPublisher:
    """Publishing = the sampler loads the learner's weights at once (a synchronous broadcast)."""

    def __init__(self, trainer: Trainer, sampler: GeneratorLoop) -> None:
        self.trainer, self.sampler = trainer, sampler
        self.epoch, self.last_published, self.members = 0, -1, ["gen-0"]

    def needs_epoch(self) -> bool:
        return False

    def publish(self, version: int, timeout_s: float, wait_loaded: bool) -> PublishResult:
        named = [(n, p.detach().clone()) for n, p in self.trainer.model.named_parameters()]
        self.sampler.backend.load_weights(named, version)  # type: ignore[attr-defined]
        self.last_published = version
        return PublishResult(version, self.members, {"gen-0": version}, True)

    def close(self) -> None:
        pass


def losses_through_the_loop() -> list[tuple[float, ...]]:
    cfg = config()
    learner_side = InMemoryStreams(cfg.run_id, "learner", max_tokens=10_000)
    sampler = make_sampler(cfg, learner_side.for_consumer("gen-0"))
    trainer = make_trainer(cfg)

    records: list[dict[str, Any]] = []
    loop = LearnerLoop(
        cfg,
        transport=learner_side,
        publisher=CopyingPublisher(trainer, sampler),
        registry=GeneratorRegistry(30.0),
        trainer=BatchTrainer(trainer, cfg.learner.advantage_mode),
        checkpointer=MemoryCheckpointer(),
        source=make_source(cfg.task),
        metrics=LearnerMetrics(CollectorRegistry(), cfg.run_id),
        vocab_size=int(trainer.model.config.vocab_size),
        clock=FakeClock(),
        on_record=records.append,
    )
    original = learner_side.read_groups

    def read_groups(count: int, block_ms: int, *, vocab_size: int | None) -> Any:
        sampler._sample_once()  # the generator answers whatever was issued
        return original(count, block_ms, vocab_size=vocab_size)

    learner_side.read_groups = read_groups  # type: ignore[method-assign]
    loop.start()
    loop.run()
    return [tuple(r[k] for k in COMPARED) for r in records]


def losses_of_a_plain_synchronous_loop() -> list[tuple[float, ...]]:
    cfg = config()
    transport = InMemoryStreams(cfg.run_id, "learner", max_tokens=10_000)
    sampler = make_sampler(cfg, transport.for_consumer("gen-0"))
    trainer = make_trainer(cfg)
    source = make_source(cfg.task)
    losses = []
    for step in range(STEPS):
        tasks = []
        for i in range(step * B, (step + 1) * B):
            item = source.at(i)
            tasks.append(
                rollout_pb2.PromptTask(
                    run_id=cfg.run_id,
                    task_id=f"t{i}",
                    prompt_id=item.problem.prompt_id,
                    prompt=item.problem.prompt,
                    answer=item.problem.answer,
                    data_index=i,
                    num_samples=cfg.sampling.num_samples,
                    issue_version=step,
                    temperature=cfg.sampling.temperature,
                    max_new_tokens=cfg.sampling.max_new_tokens,
                )
            )
        transport.issue_tasks(tasks)
        sampler._sample_once()
        groups = [d.value for d in transport.read_groups(B, 1, vocab_size=None)]
        stats = trainer.step(build_batch(groups, cfg.learner.advantage_mode))
        losses.append(tuple(float(f"{stats[k]:.6g}") for k in COMPARED))
        named = [(n, p.detach().clone()) for n, p in trainer.model.named_parameters()]
        sampler.backend.load_weights(named, step + 1)  # type: ignore[attr-defined]
    return losses


def test_max_staleness_zero_reproduces_synchronous_training() -> None:
    torch.set_num_threads(1)
    loop = losses_through_the_loop()
    plain = losses_of_a_plain_synchronous_loop()
    assert len(loop) == STEPS
    assert loop == plain
    # Not a vacuous match: gradients flowed and the policy (its entropy) moved between steps.
    assert any(row[1] > 0 for row in loop)
    assert len({row[2] for row in loop}) > 1

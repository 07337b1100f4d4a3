"""The learner service's composition root: build the real parts, run the loop.

    lpreg learner CONFIG [--resume] [--set section.field=value ...]

Everything the learner decides (admission, staleness, ack ordering, publishing) is in
``services.learner.loop``; this module only wires Redis, the weight broadcast, the gRPC control
server, the metrics endpoint, the model and its trainer to it, and writes the run's outputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpreg_core.config import RunConfig, dump_config
from lpreg_core.data import make_source
from lpreg_core.devices import compute_dtype, resolve_device, wire_dtype
from lpreg_core.weights import dtype_from_name
from lpreg_core.wire.lpreg.v1 import control_pb2, rollout_pb2
from services.common.auth import load_auth_token
from services.common.env import redis_password, redis_url
from services.common.loggers import make_loggers
from services.common.metrics import serve_metrics
from services.learner.checkpoint import (
    FileCheckpointer,
    ShardedCheckpointer,
    is_sharded,
    latest_checkpoint,
)
from services.learner.control import LearnerControlServicer, generator_status
from services.learner.distributed import Sharded, weights_layout
from services.learner.evaluate import greedy_accuracy
from services.learner.loop import LearnerLoop
from services.learner.metrics import BACKLOG_REFRESH_S, LearnerMetrics
from services.learner.publisher import BroadcastPublisher
from services.learner.registry import GeneratorRegistry
from services.learner.server import build_server
from services.learner.trainer import Trainer, build_batch
from services.transport import RedisStreams
from services.weight_sync import WeightSender

log = logging.getLogger("lpreg.learner")


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.local.run_dir.format(run_id=config.run_id))


class BatchTrainer:
    """The loop's ``PolicyTrainer``: rollout groups to a padded batch, one optimiser step."""

    def __init__(self, trainer: Trainer, advantage_mode: str) -> None:
        self.trainer = trainer
        self.advantage_mode = advantage_mode

    def train_step(self, groups: list[rollout_pb2.RolloutGroup]) -> dict[str, float]:
        return self.trainer.step(build_batch(groups, self.advantage_mode))


def status_of(loop: LearnerLoop) -> control_pb2.StatusResponse:
    """GetStatus: the loop's progress and the registry's generators."""
    s = loop.state
    reply = control_pb2.StatusResponse(
        run_id=loop.config.run_id,
        policy_version=s.version,
        step=s.step,
        epoch=loop.publisher.epoch,
        prompts_issued=s.counters["prompts_issued"],
        groups_trained=s.counters["groups_trained"],
        groups_dropped_stale=s.counters["groups_dropped_stale"],
        done=s.step >= loop.config.learner.steps,
    )
    reply.generators.extend(generator_status(g) for g in loop.registry.snapshot())
    return reply


def build_learner(
    config: RunConfig, *, resume: bool, sharded: Sharded | None = None
) -> tuple[LearnerLoop, dict[str, Any]]:
    """The loop with its real parts, and the resources ``run_learner`` must close; with
    ``sharded`` (rank 0 under torchrun) the model is sharded and the other ranks follow."""
    run_dir = run_dir_of(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.learner.num_threads)
    torch.manual_seed(config.learner.seed)
    prom = CollectorRegistry()
    metrics = LearnerMetrics(prom, config.run_id)
    device = resolve_device(config.learner.device) if sharded is None else sharded.ctx.device
    master = dtype_from_name(config.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=master)
    compute = compute_dtype(config.learner, master, device)
    if sharded is None:
        trainer = Trainer(model, config.learner, device=device, compute_dtype=compute)
    else:
        trainer = sharded.trainer(model, config.learner, compute)
    wire = wire_dtype(config.broadcast, compute)
    log.info("learner on %s: master weights %s, compute %s, wire %s", device, master, compute, wire)
    vocab_size = int(model.config.vocab_size)
    registry = GeneratorRegistry(config.generator.heartbeat_ttl_s, expected_vocab_size=vocab_size)
    transport = RedisStreams(
        config.redis,
        config.run_id,
        consumer="learner",
        password=redis_password(config.redis),
        url=redis_url(config.redis),
        on_dead_letter=lambda reason: metrics.dlq_entries.labels(reason=reason).inc(),
        max_completion_tokens=config.max_completion_tokens,
    )
    sender = WeightSender(config.broadcast, device)

    def wire_weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in model.named_parameters():
            yield name, p.detach().to(wire)

    publisher = BroadcastPublisher(
        registry,
        sender,
        wire_weights if sharded is None else sharded.weights(model, wire),
        config.broadcast,
        config.broadcast.advertise_host or config.broadcast.store_host,
        metrics,
        layout=lambda: weights_layout(model, wire),
    )
    source = make_source(config.task)
    eval_problems = source.eval_problems(config.learner.eval_prompts)
    metrics_file = run_dir / "metrics.jsonl"
    loggers = make_loggers(
        config.metrics.loggers, run_dir, config.run_id, config.model_dump(mode="json")
    )

    def on_record(record: dict[str, Any]) -> None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        loggers.log_record(record)

    def evaluate() -> float:
        if sharded is not None:
            sharded.before_evaluate()
        accuracy = greedy_accuracy(model, config, eval_problems)
        if loop.state.step == 0:
            # The accuracy before training is step 0 of the table, the plots and the dashboard.
            on_record(
                {
                    "step": 0,
                    "version": loop.state.version,
                    "eval_accuracy": accuracy,
                    "time": time.time(),
                }
            )
        return accuracy

    loop = LearnerLoop(
        config,
        transport=transport,
        publisher=publisher,
        registry=registry,
        trainer=BatchTrainer(trainer, config.learner.advantage_mode)
        if sharded is None
        else sharded.policy_trainer(trainer, config.learner.advantage_mode),
        checkpointer=checkpointer_for(config, trainer, sharded),
        source=source,
        metrics=metrics,
        vocab_size=vocab_size,
        evaluate=evaluate,
        on_record=on_record,
    )
    if resume:
        if loop.restore():
            newest = latest_checkpoint(run_dir / "checkpoints")
            if newest is not None:
                metrics.checkpoint_written(newest.stat().st_mtime)
        else:
            log.info("--resume: no checkpoint under %s; starting fresh", run_dir / "checkpoints")
    return loop, {
        "model": model,
        "prom": prom,
        "sender": sender,
        "run_dir": run_dir,
        "loggers": loggers,
    }


def checkpointer_for(
    config: RunConfig, trainer: Trainer, sharded: Sharded | None
) -> FileCheckpointer | ShardedCheckpointer:
    """Sharded checkpoints under torchrun, and in one process resuming a sharded run (the format
    then stays sharded); the file format otherwise."""
    root = run_dir_of(config) / "checkpoints"
    keep = config.learner.checkpoint.keep_last
    newest = latest_checkpoint(root)
    if sharded is None and (newest is None or not is_sharded(newest)):
        return FileCheckpointer(root, trainer.model, trainer.optimizer, trainer.scheduler, keep)
    if sharded is None:
        return ShardedCheckpointer(root, trainer.model, trainer.optimizer, trainer.scheduler, keep)
    return sharded.checkpointer(root, trainer, keep)


def save_final_model(model: Any, model_path: str, out: Path) -> None:
    """A complete Hugging Face directory: weights, config, generation config and the tokenizer
    of the starting model (without it AutoTokenizer would load an empty one)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def completion_of(config: RunConfig, summary: dict[str, Any], signal_seen: int | None) -> None:
    """Mark a summary finished or not, with the reason (an interrupted run must not look done)."""
    done = summary["steps"] >= config.learner.steps
    summary["completed"] = done
    if done:
        summary["reason"] = f"finished all {config.learner.steps} steps"
    elif signal_seen is not None:
        name = signal.Signals(signal_seen).name
        summary["reason"] = (
            f"stopped by {name} after step {summary['steps']} of {config.learner.steps}; "
            "continue with --resume"
        )
    else:
        summary["reason"] = f"stopped after step {summary['steps']} of {config.learner.steps}"


def _observe_until_stopped(loop: LearnerLoop) -> None:
    """The autoscaling and pipeline gauges move on a timer, not only once per step (a step can
    take minutes, and an idle learner takes none)."""
    while not loop.stop.wait(BACKLOG_REFRESH_S):
        loop.observe_pipeline()


def run_learner(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    sharded = Sharded.from_env(config)
    if sharded is not None and not sharded.ctx.is_main:
        sharded.follow(config)  # ranks > 0: no Redis, gRPC or metrics; rank 0 leads
        # The run is done and the process group gone: end here. An interpreter exit would run
        # the distributed runtime's C++ destructors, which can abort (SIGABRT) on a thread still
        # joinable, and torchrun would report the finished run as failed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    log.info("resolved config:\n%s", dump_config(config))
    # After a failure the other ranks may sit in a collective: rank 0's exit has torchrun stop
    # them. Only a run that returns releases them.
    summary = _run_learner(config, resume, sharded)
    if sharded is not None:
        sharded.stop()
    return summary


def _run_learner(config: RunConfig, resume: bool, sharded: Sharded | None) -> dict[str, Any]:
    loop, parts = build_learner(config, resume=resume, sharded=sharded)
    signal_seen: dict[str, int] = {}

    def _graceful(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current step", signum)
        signal_seen.setdefault("signum", signum)
        loop.stop.set()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    loop.start()
    if loop.state.step >= config.learner.steps:
        loop.metrics.set_run_complete()  # resumed a finished run: nothing is stalled
    servicer = LearnerControlServicer(
        loop.registry,
        lambda: status_of(loop),
        config.run_id,
        lambda: loop.state.version,
        config.generator.heartbeat_interval_s,
    )
    server, grpc_port = build_server(config.control, servicer, load_auth_token(config.control))
    metrics_port = serve_metrics(parts["prom"], config.metrics.host, config.metrics.learner_port)
    run_dir: Path = parts["run_dir"]
    log.info(
        "learner up: gRPC :%d, metrics :%d, store :%d, run dir %s",
        grpc_port,
        metrics_port,
        parts["sender"].port,
        run_dir,
    )
    observer = threading.Thread(
        target=_observe_until_stopped, args=(loop,), name="lpreg-observe", daemon=True
    )
    observer.start()
    try:
        summary = loop.run()
        completion_of(config, summary, signal_seen.get("signum"))
        if sharded is None:
            save_final_model(parts["model"], config.model.path, run_dir / "final_model")
        else:
            sharded.save_final_model(parts["model"], config.model.path, run_dir / "final_model")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        loop.metrics.set_run_complete()
        if not config.learner.exit_when_done and not loop.stop.is_set():
            # Generators stay registered and idle (no more tasks), instead of exiting into a
            # restart loop under a Deployment.
            log.info("run complete; staying up until stopped (learner.exit_when_done=false)")
            loop.stop.wait()
        # Only a finished run tells generators to exit: a learner that crashes or is restarted
        # leaves them running, and they re-register with the next one.
        loop.registry.close("run complete")
    except BaseException as e:
        # A crash leaves a summary that says so (the launcher shows it); the error propagates.
        failed = {
            "run_id": config.run_id,
            "steps": loop.state.step,
            "policy_version": loop.state.version,
            "completed": False,
            "reason": f"learner failed at step {loop.state.step}: {type(e).__name__}: {e}",
        }
        (run_dir / "summary.json").write_text(json.dumps(failed, indent=2) + "\n")
        raise
    finally:
        parts["loggers"].close()
        server.stop(grace=2.0)
        loop.publisher.close()
        loop.transport.close()
    return summary

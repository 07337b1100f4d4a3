"""Run loggers: where a learner's per-step records go besides metrics.jsonl and Prometheus.

One small interface, several adapters chosen by ``metrics.loggers``:

    tensorboard  event files under RUN_DIR/tensorboard (``lpreg dashboard RUN_DIR`` serves them)
    wandb        Weights & Biases (``pip install wandb``; project from $WANDB_PROJECT)
    mlflow       MLflow (``pip install mlflow``; server from $MLFLOW_TRACKING_URI)

A record is the learner's step record (``services.learner.loop``); its numeric fields become
scalars, named by ``scalar_tag`` so the dashboard groups them (reward, entropy, lpreg, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("lpreg.loggers")

TENSORBOARD_DIR = "tensorboard"

# Record keys that are not measurements of the step.
_NOT_SCALARS = {"step", "time"}
# Dashboard sections: the record key's prefix or name -> the section it is shown under.
_SECTIONS = (
    ("reward", "reward"),
    ("eval_", "eval"),
    ("entropy", "entropy"),
    ("num_regularized", "lpreg"),
    ("num_candidates", "lpreg"),
    ("loss_kl", "lpreg"),
    ("kl_", "lpreg"),
    ("loss", "loss"),
    ("staleness", "staleness"),
    ("groups_dropped_stale", "staleness"),
    ("tokens_per_s", "throughput"),
    ("num_tokens", "throughput"),
    ("wait_s", "time"),
    ("train_s", "time"),
    ("publish_s", "time"),
)


def scalar_tag(key: str) -> str:
    """``reward_mean`` -> ``reward/reward_mean``; unknown keys go under ``train/``."""
    for prefix, section in _SECTIONS:
        if key.startswith(prefix):
            return f"{section}/{key}"
    return f"train/{key}"


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, str) or value is None:
            continue
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[scalar_tag(key)] = float(value)
    return out


class RunLogger(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=5)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_id: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("metrics.loggers has wandb: pip install wandb") from e
        self.run = wandb.init(name=run_id, config=config, resume="allow")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    def __init__(self, run_id: str, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise RuntimeError("metrics.loggers has mlflow: pip install mlflow") from e
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_id)
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MultiLogger:
    """Fans a record out to every logger; a failing logger is logged, never stops training."""

    def __init__(self, loggers: list[RunLogger]) -> None:
        self.loggers = loggers

    def log_record(self, record: dict[str, Any]) -> None:
        scalars = scalars_of(record)
        for logger in self.loggers:
            try:
                logger.log(int(record["step"]), scalars)
            except Exception as e:  # a dashboard must not stop a run
                log.warning("%s failed: %s", type(logger).__name__, e)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:
                log.warning("%s did not close cleanly: %s", type(logger).__name__, e)


def make_loggers(
    names: Sequence[str], run_dir: Path, run_id: str, config: dict[str, Any]
) -> MultiLogger:
    loggers: list[RunLogger] = []
    for name in names:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
        elif name == "wandb":
            loggers.append(WandbLogger(run_id, config))
        elif name == "mlflow":
            loggers.append(MLflowLogger(run_id, config))
        else:
            raise ValueError(f"unknown logger {name!r}")
    return MultiLogger(loggers)

"""Run loggers: TensorBoard event files read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.common.loggers import TENSORBOARD_DIR, make_loggers, scalar_tag, scalars_of

RECORDS = [
    {"step": 0, "version": 0, "eval_accuracy": 0.5, "time": 1.0},
    {
        "step": 1,
        "version": 1,
        "reward_mean": 0.25,
        "entropy": 0.6,
        "num_regularized": 3.0,
        "num_candidates": 7.0,
        "loss_kl": 1e-6,
        "staleness_mean": 1.0,
        "tokens_per_s": 900.0,
        "publish_ok": True,
        "time": 2.0,
    },
    {"step": 2, "version": 2, "reward_mean": 0.5, "entropy": 0.5, "eval_accuracy": 0.75},
]


def test_scalars_are_grouped_for_the_dashboard() -> None:
    assert scalar_tag("reward_mean") == "reward/reward_mean"
    assert scalar_tag("num_regularized") == "lpreg/num_regularized"
    assert scalar_tag("staleness_mean") == "staleness/staleness_mean"
    assert scalar_tag("tokens_per_s") == "throughput/tokens_per_s"
    assert scalar_tag("eval_accuracy") == "eval/eval_accuracy"
    assert scalar_tag("grad_norm") == "train/grad_norm"
    scalars = scalars_of({"step": 3, "time": 9.0, "reason": "x", "nan": float("nan"), "lr": 1e-4})
    assert scalars == {"train/lr": 1e-4}


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    loggers = make_loggers(["tensorboard"], tmp_path, "t", {})
    for r in RECORDS:
        loggers.log_record(r)
    loggers.close()
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "reward/reward_mean",
        "entropy/entropy",
        "lpreg/num_regularized",
        "lpreg/loss_kl",
        "staleness/staleness_mean",
        "throughput/tokens_per_s",
        "eval/eval_accuracy",
    ):
        assert tag in tags, tags
    assert [(e.step, e.value) for e in acc.Scalars("reward/reward_mean")] == [(1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/eval_accuracy")] == [(0, 0.5), (2, 0.75)]


class _Broken:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        raise OSError("disk full")


def test_a_failing_logger_never_stops_the_others(tmp_path: Path) -> None:
    from services.common.loggers import MultiLogger, TensorBoardLogger

    tb = TensorBoardLogger(tmp_path)
    multi = MultiLogger([_Broken(), tb])
    multi.log_record(RECORDS[1])
    multi.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "reward/reward_mean" in acc.Tags()["scalars"]


def test_optional_loggers_say_how_to_install_them(tmp_path: Path) -> None:
    import importlib.util

    import pytest

    # An installed one would start a real run, so only the absent ones are checked.
    absent = [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is None]
    if not absent:
        pytest.skip("wandb and mlflow are both installed")
    for name in absent:
        with pytest.raises(RuntimeError, match=f"pip install {name}"):
            make_loggers([name], tmp_path, "t", {})

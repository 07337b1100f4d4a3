"""What the learner loop is built from: its clock, trainer and checkpointer interfaces, and the
state a checkpoint keeps of it. The loop (``services.learner.loop``) takes implementations of these
as arguments; ``services.learner.main`` passes the real ones, the unit tests fakes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from lpreg_core.wire.lpreg.v1 import rollout_pb2


class Clock(Protocol):
    """Time as the loop sees it; tests pass a fake that advances on ``wait``."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait until ``event`` is set or ``timeout_s`` passed; returns whether it is set."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(timeout_s)


class PolicyTrainer(Protocol):
    """One optimiser step over a step's groups; returns its statistics (loss, entropy, ...)."""

    def train_step(self, groups: list[rollout_pb2.RolloutGroup]) -> dict[str, float]: ...


class Checkpointer(Protocol):
    """Durable trainer state: ``save`` returns only once the checkpoint survives a crash."""

    def save(self, step: int, state: dict[str, Any]) -> None: ...

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint's step and loop state (the model and optimiser are restored in
        place), or None when there is none."""
        ...


@dataclass
class LoopState:
    """What a checkpoint holds of the loop (besides model, optimiser and RNGs)."""

    step: int = 0
    version: int = 0
    next_data_index: int = 0
    issued_fresh: int = 0
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "prompts_issued": 0,
            "groups_trained": 0,
            "groups_dropped_stale": 0,
        }
    )
    trained_tasks: set[str] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    # Run-level figures for the summary (e.g. the accuracy before training).
    extra: dict[str, Any] = field(default_factory=dict)
    # Data positions of the prompts outstanding when the checkpoint was written: re-issued if the
    # transport comes back without the run's state (a fresh Redis).
    outstanding_indices: list[int] = field(default_factory=list)
    # (new, base): version ``new`` names the weights of version ``base`` (a resume renumbered
    # them); staleness is measured along this lineage (lpreg_core.staleness.lineage_distance).
    aliases: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "next_data_index": self.next_data_index,
            "issued_fresh": self.issued_fresh,
            "counters": self.counters,
            "trained_tasks": sorted(self.trained_tasks),
            "history": self.history,
            "extra": self.extra,
            "outstanding_indices": self.outstanding_indices,
            "aliases": [list(a) for a in self.aliases],
        }

    @classmethod
    def from_json(cls, step: int, raw: dict[str, Any]) -> LoopState:
        return cls(
            step=step,
            version=raw["version"],
            next_data_index=raw["next_data_index"],
            issued_fresh=raw["issued_fresh"],
            counters=dict(raw["counters"]),
            trained_tasks=set(raw["trained_tasks"]),
            history=list(raw["history"]),
            extra=dict(raw.get("extra", {})),
            outstanding_indices=list(raw.get("outstanding_indices", [])),
            aliases=[(int(a), int(b)) for a, b in raw.get("aliases", [])],
        )


class RunStateExists(RuntimeError):
    """The transport already holds state of this run and the learner was not asked to resume."""

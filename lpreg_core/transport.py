"""The interfaces the learner and generators use to exchange prompt tasks and rollout groups.

The service loops code against the Protocols below and nothing else. Adapters live in
``services.transport``: ``RedisStreams`` (Redis Streams with consumer groups, the real thing) and
``InMemoryStreams`` (one process, for unit tests of the loops); one contract test suite runs
against both, so the in-memory one cannot drift from Redis semantics.

Delivery semantics (every implementation):

- A prompt task is read by one generator at a time. It stays pending until its rollout group is
  published (``publish_group_and_ack_task``, atomically) or it is acked; a pending task left idle
  for ``claim_idle_ms`` is reclaimed by the next reader and delivered with ``redelivered=True``.
  A reader's own tasks that it has not published, acked or released are never handed to it again;
  reclaiming them only renews its claim.
- The first publish for a task wins: publishing for a task that is no longer pending (already
  published, acked, or reclaimed and published by someone else) writes nothing and returns None.
  A retried publish is therefore harmless.
- A rollout group stays pending for its consumer until ``ack_groups``. The first ``read_groups`` of
  a consumer (a restarted learner) first replays that consumer's un-acked groups, then new ones.
- Entries that fail to decode or validate go to the dead-letter stream with their reason and are
  acked; a read never raises because of bad data.
- ``issue_tasks`` applies its ``ledger`` increments in the same transaction as the tasks, so the
  issuer's counters never disagree with what was issued.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from lpreg_core.wire.lpreg.v1 import rollout_pb2

T = TypeVar("T")

StreamName = Literal["prompts", "rollouts", "dlq"]


@dataclass(frozen=True)
class Delivery(Generic[T]):
    """One entry handed to a consumer: ack it by ``entry_id``.

    ``redelivered`` is True when the entry had been delivered before (reclaimed from a dead
    consumer, or replayed after a restart); consumers must treat the value idempotently.
    """

    entry_id: str
    value: T
    redelivered: bool = False


@dataclass(frozen=True)
class IssuedTask:
    """What the learner asked for, recorded with the task when it was issued: a group is checked
    against it before it is trained (nothing from the streams is trusted blindly)."""

    data_index: int
    num_samples: int
    max_new_tokens: int
    issue_version: int

    def encode(self) -> str:
        return f"{self.data_index},{self.num_samples},{self.max_new_tokens},{self.issue_version}"

    @classmethod
    def decode(cls, raw: str) -> IssuedTask:
        a, b, c, d = (int(x) for x in raw.split(","))
        return cls(a, b, c, d)

    @classmethod
    def of(cls, task: rollout_pb2.PromptTask) -> IssuedTask:
        return cls(task.data_index, task.num_samples, task.max_new_tokens, task.issue_version)


@dataclass(frozen=True)
class DeadLetter:
    """An entry of the dead-letter stream."""

    entry_id: str
    source: str
    reason: str
    detail: str
    source_entry_id: str
    ts: float
    payload: bytes


class Connection(Protocol):
    """Lifecycle shared by every transport."""

    def connect(self) -> None:
        """Wait (bounded) until the transport is reachable and its streams and groups exist."""
        ...

    def close(self) -> None: ...


class TaskQueue(Protocol):
    """Prompt tasks: the learner issues them, generators read them."""

    def issue_tasks(
        self,
        tasks: Sequence[rollout_pb2.PromptTask],
        *,
        ledger: Mapping[str, int] | None = None,
    ) -> list[str]:
        """Append tasks (all or none), record each as issued (``issued_tasks``), and add
        ``ledger`` increments, in one transaction; returns the tasks' entry ids in order."""
        ...

    def issued_tasks(self, task_ids: Sequence[str]) -> dict[str, IssuedTask]:
        """The issued, not yet retired tasks among ``task_ids``."""
        ...

    def num_issued(self) -> int:
        """Tasks issued and not yet retired: the outstanding work admission counts."""
        ...

    def all_issued(self) -> dict[str, IssuedTask]:
        """Every issued, not yet retired task (a checkpoint records their prompts)."""
        ...

    def read_tasks(self, count: int, block_ms: int) -> list[Delivery[rollout_pb2.PromptTask]]:
        """Up to ``count`` tasks: reclaimed idle ones first, then new ones, waiting up to
        ``block_ms`` when there are none. Invalid entries are dead-lettered, never returned."""
        ...

    def ack_tasks(self, entry_ids: Sequence[str]) -> int:
        """Drop tasks for good without publishing a group; returns how many were still pending."""
        ...

    def release_tasks(self, entry_ids: Sequence[str]) -> None:
        """Stop working on tasks without acking them; they are reclaimed once idle."""
        ...


class RolloutStream(Protocol):
    """Rollout groups: generators publish them, the learner reads and acks them."""

    def publish_group_and_ack_task(
        self, group: rollout_pb2.RolloutGroup, task_entry_id: str
    ) -> str | None:
        """Append ``group`` and ack its task atomically; returns the group's entry id, or None
        when the task was no longer pending (nothing is written)."""
        ...

    def read_groups(
        self, count: int, block_ms: int, *, vocab_size: int | None
    ) -> list[Delivery[rollout_pb2.RolloutGroup]]:
        """Up to ``count`` validated groups; the first call replays this consumer's un-acked ones."""
        ...

    def ack_groups(self, entry_ids: Sequence[str], *, retire: Sequence[str] = ()) -> int:
        """Ack groups whose update is durable and retire the tasks ``retire`` names (they are no
        longer outstanding), in one transaction; returns how many groups were pending."""
        ...

    def dead_letter(
        self, raw: bytes, *, source: str, reason: str, detail: str, entry_id: str
    ) -> str:
        """Record an entry in the dead-letter stream; returns its id."""
        ...


class RunState(Protocol):
    """Small shared state of a run: the current policy version and generator liveness."""

    def set_version(self, version: int) -> None: ...

    def get_version(self) -> int | None:
        """The published policy version, or None before the first publish."""
        ...

    def heartbeat(self, generator_id: str, ttl_s: float) -> None:
        """Mark ``generator_id`` alive for ``ttl_s`` seconds."""
        ...

    def live_generators(self) -> list[str]:
        """Ids of generators whose last heartbeat has not expired, sorted."""
        ...


class RunLedger(Protocol):
    """What the learner reads back about the run: its ledger and the work still in the streams."""

    def ledger(self) -> dict[str, int]:
        """The counters ``issue_tasks`` moved (empty for a run that never issued)."""
        ...

    def backlog(self) -> dict[str, int]:
        """Entries not yet done with, per stream ("prompts", "rollouts"): never delivered plus
        delivered but unacknowledged, read as one snapshot."""
        ...

    def undelivered(self) -> dict[str, int | None]:
        """Entries no consumer has read yet, per stream ("prompts", "rollouts"): the demand an
        autoscaler sees. None where the store cannot tell cheaply."""
        ...

    def dlq_length(self) -> int: ...

    def stream_lengths(self) -> dict[str, int]:
        """Entries held by the "prompts", "rollouts" and "dlq" streams."""
        ...

    def pending_counts(self) -> dict[str, int]:
        """Delivered but unacknowledged entries of the "prompts" and "rollouts" streams."""
        ...


class LearnerTransport(Connection, TaskQueue, RolloutStream, RunState, RunLedger, Protocol):
    """Everything the learner loop needs from its transport."""


class GeneratorTransport(Connection, TaskQueue, RolloutStream, RunState, Protocol):
    """Everything the generator loop needs from its transport."""

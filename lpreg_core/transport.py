"""The interfaces the learner and generators use to exchange prompt tasks and rollout groups.

Services code against the Protocols below. ``services.common.redis_streams.RedisStreams`` is the
real implementation (Redis Streams with consumer groups); :class:`InMemoryStreams` here mimics its
delivery semantics in one process, for unit tests of the logic built on top. Integration tests use
the real thing.

Delivery semantics (both implementations):

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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from lpreg_core.rollout import DLQ_REASONS, InvalidEntry, decode_group, decode_task, encode_group
from lpreg_core.rollout import encode_task as _encode_task
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
class DeadLetter:
    """An entry of the dead-letter stream."""

    entry_id: str
    source: str
    reason: str
    detail: str
    source_entry_id: str
    ts: float
    payload: bytes


class TaskQueue(Protocol):
    """Prompt tasks: the learner issues them, generators read them."""

    def issue_tasks(self, tasks: Sequence[rollout_pb2.PromptTask]) -> list[str]:
        """Append tasks (schema version stamped); returns their entry ids in order."""
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

    def ack_groups(self, entry_ids: Sequence[str]) -> int:
        """Ack groups whose update is durable; returns how many were pending."""
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


@dataclass
class _Pending:
    consumer: str
    delivered_at: float


@dataclass
class _Stream:
    entries: dict[str, bytes] = field(default_factory=dict)
    # Entry ids in append order; ids are "<seq>-0" so order is by seq.
    order: list[str] = field(default_factory=list)
    next_index: int = 0  # position in `order` of the first never-delivered entry
    pending: dict[str, _Pending] = field(default_factory=dict)


def _seq(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


class InMemoryState:
    """What a Redis server would hold for one run; shared by InMemoryStreams views.

    For unit tests only: nothing survives the process.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.cond = threading.Condition()
        self.seq = 0
        self.streams: dict[str, _Stream] = {"prompts": _Stream(), "rollouts": _Stream()}
        self.dlq: list[DeadLetter] = []
        self.version: int | None = None
        self.heartbeats: dict[str, float] = {}

    def next_id(self) -> str:
        self.seq += 1
        return f"{self.seq}-0"


class InMemoryStreams:
    """In-process stand-in for RedisStreams, for unit tests of the logic built on the Protocols.

    Implements TaskQueue, RolloutStream and RunState with the same delivery semantics as the Redis
    implementation (consumer-owned pending entries, idle reclaim, replay on first read, conditional
    publish, dead-lettering). Views created with :meth:`for_consumer` share one
    :class:`InMemoryState`, like several processes talking to one Redis. ``clock`` (on the state)
    drives idle reclaim and heartbeat expiry, so tests can advance time without sleeping;
    ``block_ms`` waits in real time for new entries.
    """

    def __init__(
        self,
        run_id: str = "test",
        consumer: str = "consumer-0",
        *,
        claim_idle_ms: int = 30_000,
        max_entry_bytes: int = 16 * 1024 * 1024,
        max_tokens: int = 1_000_000,
        on_dead_letter: Callable[[str], None] | None = None,
        state: InMemoryState | None = None,
    ) -> None:
        self.run_id = run_id
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_entry_bytes = max_entry_bytes
        self.max_tokens = max_tokens
        self.on_dead_letter = on_dead_letter
        self.state = state if state is not None else InMemoryState()
        self.num_reclaimed_tasks = 0
        self._tasks_out: set[str] = set()
        # Sequence number after which the next replay page starts; None once replay is done.
        self._replay_tasks_after: int | None = 0
        self._replay_groups_after: int | None = 0

    def for_consumer(self, consumer: str) -> InMemoryStreams:
        """Another view on the same state (another process), e.g. a second generator."""
        return InMemoryStreams(
            self.run_id,
            consumer,
            claim_idle_ms=self.claim_idle_ms,
            max_entry_bytes=self.max_entry_bytes,
            max_tokens=self.max_tokens,
            on_dead_letter=self.on_dead_letter,
            state=self.state,
        )

    # -- raw access, for tests that need a corrupt entry --------------------------------------

    def add_raw_entry(self, stream: Literal["prompts", "rollouts"], data: bytes) -> str:
        """Append arbitrary bytes, as a foreign or broken producer would."""
        with self.state.cond:
            return self._append(stream, data)

    def _append(self, stream: str, data: bytes) -> str:
        entry_id = self.state.next_id()
        s = self.state.streams[stream]
        s.entries[entry_id] = data
        s.order.append(entry_id)
        self.state.cond.notify_all()
        return entry_id

    # -- dead letters -----------------------------------------------------------------------

    def dead_letter(
        self, raw: bytes, *, source: str, reason: str, detail: str, entry_id: str
    ) -> str:
        if reason not in DLQ_REASONS:
            raise ValueError(
                f"unknown dead-letter reason {reason!r}; expected one of {DLQ_REASONS}"
            )
        with self.state.cond:
            dlq_id = self.state.next_id()
            self.state.dlq.append(
                DeadLetter(dlq_id, source, reason, detail, entry_id, time.time(), bytes(raw))
            )
        if self.on_dead_letter is not None:
            self.on_dead_letter(reason)
        return dlq_id

    def dlq_length(self) -> int:
        with self.state.cond:
            return len(self.state.dlq)

    def read_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        with self.state.cond:
            return list(self.state.dlq[:count])

    # -- delivery core ----------------------------------------------------------------------

    def _deliver(
        self, stream: str, count: int, block_ms: int, *, reclaim: bool, replay_after: int | None
    ) -> tuple[list[tuple[str, bytes, bool]], int | None]:
        """Pick up to ``count`` raw entries for this consumer and mark them pending.

        With ``replay_after`` set, only this consumer's own pending entries after that sequence
        number are returned (a page of the replay); the returned cursor is None once the replay is
        exhausted, and then new entries are delivered in the same call.
        """
        s = self.state.streams[stream]
        deadline = time.monotonic() + block_ms / 1000.0
        with self.state.cond:
            now = self.state.clock()
            if replay_after is not None:
                own = sorted(
                    (_seq(e), e)
                    for e, p in s.pending.items()
                    if p.consumer == self.consumer and _seq(e) > replay_after
                )[:count]
                if own:
                    for _, entry_id in own:
                        s.pending[entry_id].delivered_at = now
                    return [(e, s.entries[e], True) for _, e in own], own[-1][0]
            while True:
                now = self.state.clock()
                out: list[tuple[str, bytes, bool]] = []
                if reclaim:
                    idle_s = self.claim_idle_ms / 1000.0
                    for entry_id, p in sorted(s.pending.items(), key=lambda kv: _seq(kv[0])):
                        if len(out) >= count:
                            break
                        if now - p.delivered_at >= idle_s:
                            s.pending[entry_id] = _Pending(self.consumer, now)
                            if entry_id not in self._tasks_out:
                                out.append((entry_id, s.entries[entry_id], True))
                    self.num_reclaimed_tasks += len(out)
                while len(out) < count and s.next_index < len(s.order):
                    entry_id = s.order[s.next_index]
                    s.next_index += 1
                    s.pending[entry_id] = _Pending(self.consumer, now)
                    out.append((entry_id, s.entries[entry_id], False))
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out, None
                self.state.cond.wait(remaining)

    def _ack(self, stream: str, entry_ids: Sequence[str]) -> int:
        s = self.state.streams[stream]
        with self.state.cond:
            return sum(1 for e in entry_ids if s.pending.pop(e, None) is not None)

    # -- TaskQueue ----------------------------------------------------------------------------

    def issue_tasks(self, tasks: Sequence[rollout_pb2.PromptTask]) -> list[str]:
        payloads = [_encode_task(t) for t in tasks]
        with self.state.cond:
            return [self._append("prompts", p) for p in payloads]

    def read_tasks(self, count: int, block_ms: int) -> list[Delivery[rollout_pb2.PromptTask]]:
        raw_entries, self._replay_tasks_after = self._deliver(
            "prompts", count, block_ms, reclaim=True, replay_after=self._replay_tasks_after
        )
        out: list[Delivery[rollout_pb2.PromptTask]] = []
        for entry_id, raw, redelivered in raw_entries:
            try:
                task = decode_task(raw, max_bytes=self.max_entry_bytes, run_id=self.run_id)
            except InvalidEntry as e:
                self.dead_letter(
                    raw, source="prompts", reason=e.reason, detail=e.detail, entry_id=entry_id
                )
                self._ack("prompts", [entry_id])
                continue
            self._tasks_out.add(entry_id)
            out.append(Delivery(entry_id, task, redelivered))
        return out

    def ack_tasks(self, entry_ids: Sequence[str]) -> int:
        self._tasks_out.difference_update(entry_ids)
        return self._ack("prompts", entry_ids)

    def release_tasks(self, entry_ids: Sequence[str]) -> None:
        self._tasks_out.difference_update(entry_ids)

    # -- RolloutStream ------------------------------------------------------------------------

    def publish_group_and_ack_task(
        self, group: rollout_pb2.RolloutGroup, task_entry_id: str
    ) -> str | None:
        payload = encode_group(group)
        self._tasks_out.discard(task_entry_id)
        with self.state.cond:
            if self.state.streams["prompts"].pending.pop(task_entry_id, None) is None:
                return None
            return self._append("rollouts", payload)

    def read_groups(
        self, count: int, block_ms: int, *, vocab_size: int | None
    ) -> list[Delivery[rollout_pb2.RolloutGroup]]:
        raw_entries, self._replay_groups_after = self._deliver(
            "rollouts", count, block_ms, reclaim=False, replay_after=self._replay_groups_after
        )
        out: list[Delivery[rollout_pb2.RolloutGroup]] = []
        for entry_id, raw, redelivered in raw_entries:
            try:
                group = decode_group(
                    raw,
                    max_bytes=self.max_entry_bytes,
                    vocab_size=vocab_size,
                    run_id=self.run_id,
                    max_tokens=self.max_tokens,
                )
            except InvalidEntry as e:
                self.dead_letter(
                    raw, source="rollouts", reason=e.reason, detail=e.detail, entry_id=entry_id
                )
                self._ack("rollouts", [entry_id])
                continue
            out.append(Delivery(entry_id, group, redelivered))
        return out

    def ack_groups(self, entry_ids: Sequence[str]) -> int:
        return self._ack("rollouts", entry_ids)

    # -- RunState -----------------------------------------------------------------------------

    def set_version(self, version: int) -> None:
        with self.state.cond:
            self.state.version = int(version)

    def get_version(self) -> int | None:
        with self.state.cond:
            return self.state.version

    def heartbeat(self, generator_id: str, ttl_s: float) -> None:
        with self.state.cond:
            self.state.heartbeats[generator_id] = self.state.clock() + ttl_s

    def live_generators(self) -> list[str]:
        with self.state.cond:
            now = self.state.clock()
            return sorted(g for g, expiry in self.state.heartbeats.items() if expiry > now)

    # -- introspection --------------------------------------------------------------------------

    def stream_lengths(self) -> dict[str, int]:
        with self.state.cond:
            return {
                "prompts": len(self.state.streams["prompts"].order),
                "rollouts": len(self.state.streams["rollouts"].order),
                "dlq": len(self.state.dlq),
            }

    def pending_counts(self) -> dict[str, int]:
        with self.state.cond:
            return {name: len(s.pending) for name, s in self.state.streams.items()}

    def close(self) -> None:
        """Nothing to release; present so code can close either implementation."""

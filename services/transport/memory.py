"""In-process transport with Redis Streams' delivery semantics, for unit tests of the loops.

Implements ``lpreg_core.transport.LearnerTransport`` and ``GeneratorTransport`` like
``services.transport.redis_streams.RedisStreams`` does (consumer-owned pending entries, idle
reclaim, replay on first read, conditional publish, dead-lettering, a ledger moved with the
issue, a backlog snapshot). The contract suite (tests/contract) runs against both. Views made
with :meth:`InMemoryStreams.for_consumer` share one :class:`InMemoryState`, like several processes
talking to one Redis. Nothing survives the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lpreg_core.rollout import DLQ_REASONS, InvalidEntry, decode_group, decode_task, encode_group
from lpreg_core.rollout import encode_task as _encode_task
from lpreg_core.transport import DeadLetter, Delivery, IssuedTask
from lpreg_core.wire.lpreg.v1 import rollout_pb2


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
        self.ledger: dict[str, int] = {}
        self.issued: dict[str, str] = {}

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
        max_completion_tokens: int | None = None,
        on_dead_letter: Callable[[str], None] | None = None,
        state: InMemoryState | None = None,
    ) -> None:
        self.run_id = run_id
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_entry_bytes = max_entry_bytes
        self.max_tokens = max_tokens
        self.max_completion_tokens = max_completion_tokens
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
            max_completion_tokens=self.max_completion_tokens,
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
        with self.state.cond:  # reentrant: callers may hold it
            return sum(1 for e in entry_ids if s.pending.pop(e, None) is not None)

    # -- TaskQueue ----------------------------------------------------------------------------

    def issue_tasks(
        self,
        tasks: Sequence[rollout_pb2.PromptTask],
        *,
        ledger: Mapping[str, int] | None = None,
    ) -> list[str]:
        payloads = [_encode_task(t) for t in tasks]
        with self.state.cond:
            for t in tasks:
                self.state.issued[t.task_id] = IssuedTask.of(t).encode()
            for name, incr in (ledger or {}).items():
                self.state.ledger[name] = self.state.ledger.get(name, 0) + int(incr)
            return [self._append("prompts", p) for p in payloads]

    def read_tasks(self, count: int, block_ms: int) -> list[Delivery[rollout_pb2.PromptTask]]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
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
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
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
                    max_completion_tokens=self.max_completion_tokens,
                )
            except InvalidEntry as e:
                self.dead_letter(
                    raw, source="rollouts", reason=e.reason, detail=e.detail, entry_id=entry_id
                )
                self._ack("rollouts", [entry_id])
                continue
            out.append(Delivery(entry_id, group, redelivered))
        return out

    def ack_groups(self, entry_ids: Sequence[str], *, retire: Sequence[str] = ()) -> int:
        with self.state.cond:
            for task_id in retire:
                self.state.issued.pop(task_id, None)
            return self._ack("rollouts", entry_ids)

    def issued_tasks(self, task_ids: Sequence[str]) -> dict[str, IssuedTask]:
        with self.state.cond:
            return {
                t: IssuedTask.decode(self.state.issued[t])
                for t in task_ids
                if t in self.state.issued
            }

    def all_issued(self) -> dict[str, IssuedTask]:
        with self.state.cond:
            return {t: IssuedTask.decode(v) for t, v in self.state.issued.items()}

    def num_issued(self) -> int:
        with self.state.cond:
            return len(self.state.issued)

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

    def ledger(self) -> dict[str, int]:
        with self.state.cond:
            return dict(self.state.ledger)

    def undelivered(self) -> dict[str, int | None]:
        with self.state.cond:
            return {name: len(s.order) - s.next_index for name, s in self.state.streams.items()}

    def backlog(self) -> dict[str, int]:
        with self.state.cond:
            return {
                name: len(s.order) - s.next_index + len(s.pending)
                for name, s in self.state.streams.items()
            }

    # -- lifecycle ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Always reachable; present so code can connect either implementation."""

    def close(self) -> None:
        """Nothing to release; present so code can close either implementation."""

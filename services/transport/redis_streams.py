"""Redis Streams delivery of prompt tasks and rollout groups (docs/design.md, section 3).

Every entry has one field, ``data``: protobuf bytes written by lpreg_core.rollout. Nothing is
pickled. Delivery semantics are those documented in lpreg_core.transport; the key layout, retries,
run state and trimming are in ``services.transport.redis_conn``. ``issue_tasks`` and
``ack_groups`` trim what every consumer group has acked, so streams stay bounded by the admitted,
un-acked work. Usage::

    streams = RedisStreams(config.redis, run_id, consumer="gen-0", password=env_password)
    streams.connect()
    for d in streams.read_tasks(count=8, block_ms=500):
        group = sample_and_score(d.value)
        streams.publish_group_and_ack_task(group, d.entry_id)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from lpreg_core.rollout import (
    DEFAULT_MAX_TOKENS,
    DLQ_REASONS,
    InvalidEntry,
    decode_group,
    decode_task,
    encode_group,
    encode_task,
)
from lpreg_core.transport import DeadLetter, Delivery, IssuedTask
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.transport.redis_conn import (
    ROLLOUT_GROUP,
    TASK_GROUP,
    RedisConnection,
    TransportAuthError,
    TransportUnavailable,
    entry_id_str,
    redact_url,
)

if TYPE_CHECKING:
    from lpreg_core.config import RedisConfig

__all__ = [
    "ROLLOUT_GROUP",
    "TASK_GROUP",
    "RedisStreams",
    "TransportAuthError",
    "TransportUnavailable",
    "redact_url",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATA_FIELD = b"data"

# A blocking XREADGROUP must return before the socket read times out, or a healthy but idle
# stream would look like a dead connection.
_BLOCK_MARGIN_MS = 1000

# Publishing is conditional on the task still being pending, so that the first group for a task
# wins: a task reclaimed from a slow generator and finished by two of them, or a publish retried
# after its reply was lost, writes one group, not two. The group is appended with a plain XADD and
# this script runs right after it in the same MULTI/EXEC (atomic: nothing runs in between, so the
# stream's newest entry is that group). The group's bytes never enter the script: handing a script
# a 256 KiB argument costs more than the XADD itself. The script acks the task if it is still
# pending. Otherwise (or when the task's consumer group is missing) it deletes the group again and
# restores the stream's entries-added and max-deleted-entry-id counters, so that the consumer
# group's lag (RedisConnection.undelivered) stays exact; a missing consumer group is returned as
# the NOGROUP error (the groups are recreated and the publish retried). A failed XADD (the key is
# not a stream) acks nothing.
_PUBLISH_SCRIPT = """
if redis.call('TYPE', KEYS[2])['ok'] ~= 'stream' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a stream; nothing was published')
end
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending['err'] == nil and #pending == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
local info = redis.call('XINFO', 'STREAM', KEYS[2])
local stream = {}
for i = 1, #info, 2 do
  stream[info[i]] = info[i + 1]
end
local id = stream['last-generated-id']
redis.call('XDEL', KEYS[2], id)
if stream['entries-added'] then
  redis.pcall('XSETID', KEYS[2], id, 'ENTRIESADDED', stream['entries-added'] - 1,
              'MAXDELETEDID', stream['max-deleted-entry-id'])
end
if pending['err'] ~= nil then
  return pending
end
return 0
"""


class RedisStreams(RedisConnection):
    """LearnerTransport and GeneratorTransport over Redis Streams, for one run and one consumer.

    ``consumer`` names this process inside the consumer groups; a learner must keep the same name
    across restarts (its un-acked groups are replayed to that name). ``on_dead_letter(reason)`` is
    called for every entry moved to the dead-letter stream (for a metrics counter). Publishing,
    acking and the RunState calls may come from any thread; reads of one stream should come from
    one thread at a time (they advance this consumer's cursors).
    """

    def __init__(
        self,
        config: RedisConfig,
        run_id: str,
        consumer: str,
        *,
        password: str | None = None,
        url: str | None = None,
        on_dead_letter: Callable[[str], None] | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_completion_tokens: int | None = None,
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 60.0,
    ) -> None:
        if not consumer:
            raise ValueError("consumer name must not be empty")
        super().__init__(
            config,
            run_id,
            password=password,
            url=url,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
        )
        self.consumer = consumer
        self.on_dead_letter = on_dead_letter
        self.max_tokens = max_tokens
        self.max_completion_tokens = max_completion_tokens
        self._max_block_ms = max(1, int(socket_timeout_s * 1000) - _BLOCK_MARGIN_MS)
        # Replay cursors: the first read of each stream re-reads this consumer's own pending
        # entries (id "0" onwards) before new ones; None once the replay is done.
        self._replay_tasks_after: str | None = "0"
        self._replay_groups_after: str | None = "0"
        self._claim_cursor = "0-0"
        # Entries handed out by this object and not yet acked: a replay after a reconnect skips
        # them (they are in the consumer's hands) and recovers only reads whose reply was lost.
        self._tasks_out: set[str] = set()
        self._groups_out: set[str] = set()
        self.num_reclaimed_tasks = 0
        self.num_dead_lettered = 0

    def issued_tasks(self, task_ids: Sequence[str]) -> dict[str, IssuedTask]:
        if not task_ids:
            return {}
        values = self._call("issued_tasks", lambda: self._redis.hmget(self.issued_key, task_ids))
        return {
            t: IssuedTask.decode(entry_id_str(v))
            for t, v in zip(task_ids, values, strict=True)
            if v is not None
        }

    def all_issued(self) -> dict[str, IssuedTask]:
        raw = self._call("all_issued", lambda: self._redis.hgetall(self.issued_key))
        return {entry_id_str(t): IssuedTask.decode(entry_id_str(v)) for t, v in raw.items()}

    def num_issued(self) -> int:
        return int(self._call("num_issued", lambda: self._redis.hlen(self.issued_key)))

    def _after_retry(self) -> None:
        # A read whose reply was lost left entries pending for us that nobody will return; the
        # next read replays our pending list (skipping what we already handed out).
        self._replay_tasks_after = "0"
        self._replay_groups_after = "0"

    def _block(self, block_ms: int) -> int | None:
        """XREADGROUP's BLOCK argument: None for no wait (BLOCK 0 would wait for ever)."""
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0, got {block_ms}")
        return min(block_ms, self._max_block_ms) or None

    # -- dead letters -------------------------------------------------------------------------

    def _dead_letter_fields(
        self, raw: bytes, source: str, reason: str, detail: str, entry_id: str
    ) -> dict[bytes | str, bytes | str | float]:
        if reason not in DLQ_REASONS:
            raise ValueError(
                f"unknown dead-letter reason {reason!r}; expected one of {DLQ_REASONS}"
            )
        # An oversized entry is kept only in part: the DLQ is for diagnosis, not a second copy.
        payload = bytes(raw[: self.config.max_entry_bytes])
        return {
            "payload": payload,
            "payload_bytes": len(raw),
            "source": source,
            "reason": reason,
            "detail": detail,
            "entry_id": entry_id,
            "ts": time.time(),
        }

    def dead_letter(
        self, raw: bytes, *, source: str, reason: str, detail: str, entry_id: str
    ) -> str:
        """Append an entry to the dead-letter stream; returns its id."""
        fields = self._dead_letter_fields(raw, source, reason, detail, entry_id)
        dlq_id = self._call(
            "dead_letter",
            lambda: self._redis.xadd(
                self.dlq_key, fields, maxlen=self.config.stream_maxlen, approximate=True
            ),
        )
        self._count_dead_letter(reason)
        return entry_id_str(dlq_id)

    def _dead_letter_and_ack(
        self, key: str, group: str, entry_id: str, raw: bytes, error: InvalidEntry
    ) -> None:
        source = key.rsplit(":", 1)[-1]
        logger.warning("dead-lettering %s entry %s: %s", source, entry_id, error)
        fields = self._dead_letter_fields(raw, source, error.reason, error.detail, entry_id)

        def move() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(self.dlq_key, fields, maxlen=self.config.stream_maxlen, approximate=True)
            pipe.xack(key, group, entry_id)
            pipe.execute()

        self._call("dead_letter", move)
        self._count_dead_letter(error.reason)

    def _count_dead_letter(self, reason: str) -> None:
        with self._lock:
            self.num_dead_lettered += 1
        if self.on_dead_letter is not None:
            self.on_dead_letter(reason)

    def dlq_length(self) -> int:
        return int(self._call("dlq_length", lambda: self._redis.xlen(self.dlq_key)))

    def read_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead-letter entries."""
        rows = self._call(
            "read_dead_letters", lambda: self._redis.xrange(self.dlq_key, count=count)
        )
        out = []
        for entry_id, f in rows:
            out.append(
                DeadLetter(
                    entry_id=entry_id_str(entry_id),
                    source=f.get(b"source", b"").decode(errors="replace"),
                    reason=f.get(b"reason", b"").decode(errors="replace"),
                    detail=f.get(b"detail", b"").decode(errors="replace"),
                    source_entry_id=f.get(b"entry_id", b"").decode(errors="replace"),
                    ts=float(f.get(b"ts", b"0")),
                    payload=f.get(b"payload", b""),
                )
            )
        return out

    # -- shared read path ---------------------------------------------------------------------

    def _decode_entries(
        self,
        key: str,
        group: str,
        entries: list[tuple[bytes, dict[bytes, bytes] | None]],
        redelivered: bool,
        decode: Callable[[bytes], T],
        handed_out: set[str],
    ) -> list[Delivery[T]]:
        out: list[Delivery[T]] = []
        for raw_id, fields in entries:
            entry_id = entry_id_str(raw_id)
            if fields is None:
                # Deleted while pending: nothing to process, only the ack is left.
                self._ack_one(key, group, entry_id)
                continue
            raw = fields.get(DATA_FIELD)
            try:
                if raw is None:
                    names = sorted(k.decode(errors="replace") for k in fields)
                    raise InvalidEntry("decode", f"entry has no 'data' field (fields: {names})")
                value = decode(raw)
            except InvalidEntry as e:
                payload = raw if raw is not None else repr(fields).encode()
                self._dead_letter_and_ack(key, group, entry_id, payload, e)
                continue
            with self._lock:
                handed_out.add(entry_id)
            out.append(Delivery(entry_id, value, redelivered))
        return out

    def _ack_one(self, key: str, group: str, entry_id: str) -> None:
        self._call("ack", lambda: self._redis.xack(key, group, entry_id))

    def _replay_page(
        self, key: str, group: str, after: str, count: int, handed_out: set[str]
    ) -> tuple[list[tuple[bytes, dict[bytes, bytes] | None]], str | None]:
        """One page of this consumer's own pending entries after ``after``, minus those already
        handed out; returns (entries, next cursor or None when the replay is done)."""
        cursor = after
        while True:
            entries = self._read_own_pending(key, group, cursor, count)
            if not entries:
                return [], None
            cursor = entry_id_str(entries[-1][0])
            with self._lock:
                fresh = [e for e in entries if entry_id_str(e[0]) not in handed_out]
            if fresh:
                return fresh, cursor

    def _read_own_pending(
        self, key: str, group: str, after: str, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        reply = self._call(
            "replay",
            lambda: self._redis.xreadgroup(group, self.consumer, {key: after}, count=count),
        )
        return reply[0][1] if reply else []

    def _read_new(
        self, key: str, group: str, count: int, block_ms: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        reply = self._call(
            "read",
            lambda: self._redis.xreadgroup(
                group, self.consumer, {key: ">"}, count=count, block=block_ms
            ),
        )
        return reply[0][1] if reply else []

    # -- TaskQueue ----------------------------------------------------------------------------

    def issue_tasks(
        self,
        tasks: Sequence[rollout_pb2.PromptTask],
        *,
        ledger: Mapping[str, int] | None = None,
    ) -> list[str]:
        """Append tasks in one transaction (all or none); returns their entry ids in order.

        ``ledger`` increments are applied to the run's ledger hash in the same transaction, so
        the issuer's data position and counters survive a learner crash exactly in step with
        what was issued. A retry after a lost EXEC reply can issue a batch twice; consumers
        dedupe by task_id.
        """
        payloads = [encode_task(t) for t in tasks]
        if not payloads and not ledger:
            return []

        def add() -> list[bytes]:
            pipe = self._redis.pipeline(transaction=True)
            for p in payloads:
                pipe.xadd(self.prompts_key, {DATA_FIELD: p})
            if tasks:
                pipe.hset(
                    self.issued_key, mapping={t.task_id: IssuedTask.of(t).encode() for t in tasks}
                )
            for field, incr in (ledger or {}).items():
                pipe.hincrby(self.ledger_key, field, int(incr))
            return list(pipe.execute())[: len(payloads)]

        ids = [entry_id_str(i) for i in self._call("issue_tasks", add)]
        self._trim(self.prompts_key)
        return ids

    def read_tasks(self, count: int, block_ms: int) -> list[Delivery[rollout_pb2.PromptTask]]:
        """Up to ``count`` tasks: this consumer's own pending ones on the first call, then tasks
        idle longer than claim_idle_ms (XAUTOCLAIM), then new ones (XREADGROUP, waiting up to
        ``block_ms``). Reclaimed and replayed tasks have ``redelivered=True``.

        A task stays with this object until it is published, acked or released; it is never
        handed out twice meanwhile, and each call renews its claim on those that went idle.
        Generations longer than claim_idle_ms should keep calling read_tasks (or raise
        claim_idle_ms), or another generator may take the task over; the first group published
        for a task wins either way."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")

        def decode(raw: bytes) -> rollout_pb2.PromptTask:
            return decode_task(raw, max_bytes=self.config.max_entry_bytes, run_id=self.run_id)

        key, group = self.prompts_key, TASK_GROUP
        with self._lock:
            after = self._replay_tasks_after
        if after is not None:
            entries, cursor = self._replay_page(key, group, after, count, self._tasks_out)
            with self._lock:
                self._replay_tasks_after = cursor
            if entries:
                return self._decode_entries(key, group, entries, True, decode, self._tasks_out)

        claimed = self._call(
            "reclaim",
            lambda: self._redis.xautoclaim(
                key,
                group,
                self.consumer,
                min_idle_time=self.config.claim_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            ),
        )
        self._claim_cursor = entry_id_str(claimed[0])
        # Our own tasks still being worked on come back once they idle past claim_idle_ms; the
        # claim has reset their idle time (keeping them ours), and they must not be handed out
        # twice.
        with self._lock:
            claimed_entries = [e for e in claimed[1] if entry_id_str(e[0]) not in self._tasks_out]
            self.num_reclaimed_tasks += len(claimed_entries)
        if claimed_entries:
            logger.info("reclaimed %d idle prompt task(s)", len(claimed_entries))
        out = self._decode_entries(key, group, claimed_entries, True, decode, self._tasks_out)
        remaining = count - len(claimed_entries)
        if remaining > 0:
            block = None if claimed_entries else self._block(block_ms)
            new = self._read_new(key, group, remaining, block)
            out += self._decode_entries(key, group, new, False, decode, self._tasks_out)
        return out

    def release_tasks(self, entry_ids: Sequence[str]) -> None:
        """Stop working on tasks without acking them: they stay pending and are reclaimed (by
        any generator, this one included) once idle for claim_idle_ms."""
        with self._lock:
            self._tasks_out.difference_update(entry_ids)

    def ack_tasks(self, entry_ids: Sequence[str]) -> int:
        """Give up tasks without publishing; returns how many were still pending."""
        if not entry_ids:
            return 0
        n = self._call(
            "ack_tasks", lambda: self._redis.xack(self.prompts_key, TASK_GROUP, *entry_ids)
        )
        with self._lock:
            self._tasks_out.difference_update(entry_ids)
        return int(n)

    # -- RolloutStream ------------------------------------------------------------------------

    def publish_group_and_ack_task(
        self, group: rollout_pb2.RolloutGroup, task_entry_id: str
    ) -> str | None:
        """Append ``group`` to the rollouts stream and ack its task, atomically.

        Returns the group's entry id, or None when the task was no longer pending (published
        already, by this or another generator, or acked): the group is then deleted again in the
        same transaction, unseen by any reader, and the stream's counters are restored.
        """
        payload = encode_group(group)

        def publish() -> bytes | None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(self.rollouts_key, {DATA_FIELD: payload})
            # EVAL, not EVALSHA: a script cache flushed between load and EXEC must not leave the
            # group written and the task pending.
            pipe.eval(
                _PUBLISH_SCRIPT, 2, self.prompts_key, self.rollouts_key, TASK_GROUP, task_entry_id
            )
            added, acked = pipe.execute(raise_on_error=False)
            # Raised as Redis sent them (not annotated by the pipeline), so that _call knows
            # NOGROUP. An XADD error with the task acked means a stream whose ids were exhausted
            # by a hand-written entry: loud, since the task has left the queue.
            if isinstance(acked, Exception):
                raise acked
            if isinstance(added, Exception):
                raise added
            return added if acked else None

        entry_id = self._call("publish", publish)
        with self._lock:
            self._tasks_out.discard(task_entry_id)
        if entry_id is None:
            logger.info("task %s no longer pending; its group was not published", task_entry_id)
            return None
        return entry_id_str(entry_id)

    def read_groups(
        self, count: int, block_ms: int, *, vocab_size: int | None
    ) -> list[Delivery[rollout_pb2.RolloutGroup]]:
        """Up to ``count`` validated groups. The first call (and the first after a reconnect)
        replays this consumer's un-acked groups, page by page, before new ones are read; replayed
        groups have ``redelivered=True``. Invalid entries are dead-lettered and acked."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")

        def decode(raw: bytes) -> rollout_pb2.RolloutGroup:
            return decode_group(
                raw,
                max_bytes=self.config.max_entry_bytes,
                vocab_size=vocab_size,
                run_id=self.run_id,
                max_tokens=self.max_tokens,
                max_completion_tokens=self.max_completion_tokens,
            )

        key, group = self.rollouts_key, ROLLOUT_GROUP
        with self._lock:
            after = self._replay_groups_after
        if after is not None:
            entries, cursor = self._replay_page(key, group, after, count, self._groups_out)
            with self._lock:
                self._replay_groups_after = cursor
            if entries:
                return self._decode_entries(key, group, entries, True, decode, self._groups_out)
        new = self._read_new(key, group, count, self._block(block_ms))
        return self._decode_entries(key, group, new, False, decode, self._groups_out)

    def ack_groups(self, entry_ids: Sequence[str], *, retire: Sequence[str] = ()) -> int:
        """Ack groups whose update is durable and retire the tasks named in ``retire``, in one
        transaction; returns how many groups were pending. Fully consumed entries are then
        trimmed from the stream."""
        if not entry_ids and not retire:
            return 0

        def ack() -> int:
            pipe = self._redis.pipeline(transaction=True)
            if entry_ids:
                pipe.xack(self.rollouts_key, ROLLOUT_GROUP, *entry_ids)
            if retire:
                pipe.hdel(self.issued_key, *retire)
            replies = pipe.execute()
            return int(replies[0]) if entry_ids else 0

        n = self._call("ack_groups", ack)
        with self._lock:
            self._groups_out.difference_update(entry_ids)
        self._trim(self.rollouts_key)
        return int(n)

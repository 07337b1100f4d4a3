"""Redis Streams transport of prompt tasks and rollout groups (DESIGN.md, "Redis").

Keys of run R (``RunConfig.stream_prefix`` is ``lpreg:R``):

    lpreg:R:prompts    prompt tasks, consumer group "generators"
    lpreg:R:rollouts   rollout groups, consumer group "learner"
    lpreg:R:dlq        entries that failed to decode or validate, with the reason
    lpreg:R:version    current policy version
    lpreg:R:gen:<id>   generator heartbeat, expires after its TTL

Every entry has one field, ``data``: protobuf bytes written by lpreg_core.rollout. Nothing is
pickled. Delivery semantics are those documented in lpreg_core.transport.

Trimming. Prompt and rollout entries are never capped with XADD MAXLEN: a cap drops the oldest
entries whether or not they were acked, and a learner that falls behind (or a generator pool that
is down) would silently lose tasks or groups. Instead :meth:`RedisStreams.trim_acknowledged`
deletes only entries that every consumer group has been delivered and acked (XTRIM MINID below the
oldest pending and the first undelivered entry); ``issue_tasks`` and ``ack_groups`` call it, so
streams stay bounded by the admitted, un-acked work. Only the dead-letter stream, which is
diagnostic, is capped at ``RedisConfig.stream_maxlen`` (approximately).

Connection failures (a Redis restart, a network blip) are retried with bounded exponential backoff
(``connect_retries``, ``retry_backoff_s``, ``retry_backoff_max_s``); after the last try the
operation raises :class:`TransportUnavailable`. A group lost with a Redis that came back empty is
recreated. Usage::

    streams = RedisStreams(config.redis, run_id, consumer="gen-0", password=env_password)
    streams.connect()
    for d in streams.read_tasks(count=8, block_ms=500):
        group = sample_and_score(d.value)
        streams.publish_group_and_ack_task(group, d.entry_id)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lpreg_core.rollout import (
    DEFAULT_MAX_TOKENS,
    DLQ_REASONS,
    InvalidEntry,
    decode_group,
    decode_task,
    encode_group,
    encode_task,
)
from lpreg_core.transport import DeadLetter, Delivery
from lpreg_core.wire.lpreg.v1 import rollout_pb2
from services.common.retry import retry_call

if TYPE_CHECKING:
    from lpreg_core.config import RedisConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATA_FIELD = b"data"
TASK_GROUP = "generators"
ROLLOUT_GROUP = "learner"

# A blocking XREADGROUP must return before the socket read times out, or a healthy but idle
# stream would look like a dead connection.
_BLOCK_MARGIN_MS = 1000

# Publishing is conditional on the task still being pending, so that the first group for a task
# wins: a task reclaimed from a slow generator and finished by two of them, or a publish retried
# after its reply was lost, writes one group, not two. A script is atomic like MULTI/EXEC and,
# unlike it, can branch on the XPENDING result.
_PUBLISH_SCRIPT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
"""

_RETRYABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class TransportUnavailable(Exception):
    """Redis could not be reached within the configured retries."""


class TransportAuthError(TransportUnavailable):
    """Redis refused the credentials; retrying cannot help."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis url>"


def _entry_id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = (int(p) for p in entry_id.split("-"))
    return f"{ms + 1}-0" if seq == 2**64 - 1 else f"{ms}-{seq + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class RedisStreams:
    """TaskQueue, RolloutStream and RunState over Redis Streams, for one run and one consumer.

    ``consumer`` names this process inside the consumer groups; a learner must keep the same name
    across restarts (its un-acked groups are replayed to that name). ``url`` overrides
    ``config.url`` (e.g. with LPREG_REDIS_URL); ``password`` is used unless the URL carries one.
    ``on_dead_letter(reason)`` is called for every entry moved to the dead-letter stream (for a
    metrics counter). Publishing, acking and the RunState calls may come from any thread; reads of
    one stream should come from one thread at a time (they advance this consumer's cursors).
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
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 60.0,
    ) -> None:
        if not consumer:
            raise ValueError("consumer name must not be empty")
        self.config = config
        self.run_id = run_id
        self.consumer = consumer
        self.on_dead_letter = on_dead_letter
        self.max_tokens = max_tokens
        self.url = url if url is not None else config.url
        self.safe_url = redact_url(self.url)
        prefix = f"lpreg:{run_id}"
        self.prompts_key = f"{prefix}:prompts"
        self.rollouts_key = f"{prefix}:rollouts"
        self.dlq_key = f"{prefix}:dlq"
        self.version_key = f"{prefix}:version"
        self.heartbeat_prefix = f"{prefix}:gen:"
        self.ledger_key = f"{prefix}:ledger"
        self._max_block_ms = max(1, int(socket_timeout_s * 1000) - _BLOCK_MARGIN_MS)
        kwargs: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": socket_timeout_s,
            "socket_keepalive": True,
            # Retries are ours (bounded, logged, ending in TransportUnavailable); redis-py's own
            # would multiply with them.
            "retry": Retry(NoBackoff(), 0),
        }
        if password is not None:
            kwargs["password"] = password
        # redis-py types every command as "Awaitable | Any" (sync and asyncio share stubs).
        self._redis: Any = redis.Redis.from_url(self.url, **kwargs)
        self._publish = self._redis.register_script(_PUBLISH_SCRIPT)
        self._lock = threading.Lock()
        # Replay cursors: the first read of each stream re-reads this consumer's own pending
        # entries (id "0" onwards) before new ones; None once the replay is done.
        self._replay_tasks_after: str | None = "0"
        self._replay_groups_after: str | None = "0"
        self._claim_cursor = "0-0"
        # Entries handed out by this object and not yet acked: a replay after a reconnect skips
        # them (they are in the consumer's hands) and recovers only reads whose reply was lost.
        self._tasks_out: set[str] = set()
        self._groups_out: set[str] = set()
        self.num_retries = 0
        self.num_reclaimed_tasks = 0
        self.num_dead_lettered = 0

    # -- plumbing -----------------------------------------------------------------------------

    def _on_retry(self, op: str, attempt: int, error: BaseException, delay_s: float) -> None:
        with self._lock:
            self.num_retries += 1
            # A read whose reply was lost left entries pending for us that nobody will return;
            # the next read replays our pending list (skipping what we already handed out).
            self._replay_tasks_after = "0"
            self._replay_groups_after = "0"
        logger.warning(
            "redis %s: %s (%s); retry %d in %.2fs", op, error, self.safe_url, attempt, delay_s
        )

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retries on connection errors; recreate lost consumer groups."""
        attempts = self.config.connect_retries + 1

        def once() -> T:
            try:
                return fn()
            except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as e:
                raise TransportAuthError(
                    f"Redis at {self.safe_url} refused the credentials during {op}: {e} (the "
                    f"password comes from the variable named by redis.password_env, "
                    f"{self.config.password_env})"
                ) from e
            except redis.exceptions.ResponseError as e:
                if not str(e).startswith("NOGROUP"):
                    raise
                logger.warning("redis %s: %s; recreating consumer groups", op, e)
                self._create_groups()
                return fn()

        try:
            return retry_call(
                once,
                attempts=attempts,
                base_s=self.config.retry_backoff_s,
                max_s=self.config.retry_backoff_max_s,
                retry_on=_RETRYABLE,
                on_retry=lambda attempt, err, delay: self._on_retry(op, attempt, err, delay),
                jitter=True,
            )
        except _RETRYABLE as e:
            raise TransportUnavailable(
                f"Redis at {self.safe_url} is unreachable: {op} failed {attempts} times "
                f"(last error: {e})"
            ) from e

    def _create_groups(self) -> None:
        for key, group in ((self.prompts_key, TASK_GROUP), (self.rollouts_key, ROLLOUT_GROUP)):
            try:
                self._redis.xgroup_create(key, group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise

    def connect(self) -> None:
        """Wait for Redis (bounded retries), then create the consumer groups if missing.

        Raises TransportUnavailable naming the URL (without password) after the last try.
        """
        self._call("connect", self._redis.ping)
        self.ensure_groups()
        logger.info(
            "connected to redis at %s (run %s, consumer %s)",
            self.safe_url,
            self.run_id,
            self.consumer,
        )

    def ensure_groups(self) -> None:
        """Create both streams and their consumer groups; idempotent."""
        self._call("ensure_groups", self._create_groups)

    def close(self) -> None:
        self._redis.close()

    def _block(self, block_ms: int) -> int:
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0, got {block_ms}")
        return min(block_ms, self._max_block_ms)

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
        return _entry_id(dlq_id)

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
                    entry_id=_entry_id(entry_id),
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
            entry_id = _entry_id(raw_id)
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
            cursor = _entry_id(entries[-1][0])
            with self._lock:
                fresh = [e for e in entries if _entry_id(e[0]) not in handed_out]
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
            for field, incr in (ledger or {}).items():
                pipe.hincrby(self.ledger_key, field, int(incr))
            return list(pipe.execute())[: len(payloads)]

        ids = [_entry_id(i) for i in self._call("issue_tasks", add)]
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
        self._claim_cursor = _entry_id(claimed[0])
        # Our own tasks still being worked on come back once they idle past claim_idle_ms; the
        # claim has reset their idle time (keeping them ours), and they must not be handed out
        # twice.
        with self._lock:
            claimed_entries = [e for e in claimed[1] if _entry_id(e[0]) not in self._tasks_out]
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
        already, by this or another generator, or acked): nothing is written then.
        """
        payload = encode_group(group)
        entry_id = self._call(
            "publish",
            lambda: self._publish(
                keys=[self.prompts_key, self.rollouts_key],
                args=[TASK_GROUP, task_entry_id, payload],
            ),
        )
        with self._lock:
            self._tasks_out.discard(task_entry_id)
        if entry_id is None:
            logger.info("task %s no longer pending; its group was not published", task_entry_id)
            return None
        return _entry_id(entry_id)

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

    def ack_groups(self, entry_ids: Sequence[str]) -> int:
        """Ack groups whose update is durable; returns how many were pending. Fully consumed
        entries are then trimmed from the stream."""
        if not entry_ids:
            return 0
        n = self._call(
            "ack_groups", lambda: self._redis.xack(self.rollouts_key, ROLLOUT_GROUP, *entry_ids)
        )
        with self._lock:
            self._groups_out.difference_update(entry_ids)
        self._trim(self.rollouts_key)
        return int(n)

    # -- trimming -----------------------------------------------------------------------------

    def _safe_min_id(self, key: str) -> str | None:
        """The smallest id that some consumer group still needs (pending or not yet delivered);
        entries below it are safe to delete. None when nothing can be deleted."""
        groups = self._redis.xinfo_groups(key)
        bound: tuple[int, int] | None = None
        for g in groups:
            last = _entry_id(g["last-delivered-id"])
            if last == "0-0":
                return None
            needed = _next_id(last)
            if int(g["pending"]) > 0:
                summary = self._redis.xpending(key, g["name"])
                if summary["min"] is not None:
                    needed = _entry_id(summary["min"])
            k = _id_key(needed)
            bound = k if bound is None or k < bound else bound
        if bound is None:
            return None
        return f"{bound[0]}-{bound[1]}"

    def trim_acknowledged(self) -> dict[str, int]:
        """Delete entries of the prompt and rollout streams that every consumer group has acked;
        returns how many were deleted per stream (approximate trimming: whole internal nodes
        only, so recent acked entries may stay until a later call)."""
        return {
            "prompts": self._trim(self.prompts_key),
            "rollouts": self._trim(self.rollouts_key),
        }

    def _trim(self, key: str) -> int:
        def trim() -> int:
            min_id = self._safe_min_id(key)
            if min_id is None:
                return 0
            return int(self._redis.xtrim(key, minid=min_id, approximate=True))

        try:
            return self._call("trim", trim)
        except redis.exceptions.ResponseError as e:
            # Trimming is housekeeping: a stream without groups yet is left alone, not an error.
            logger.warning("not trimming %s: %s", key, e)
            return 0

    # -- RunState -----------------------------------------------------------------------------

    def set_version(self, version: int) -> None:
        self._call("set_version", lambda: self._redis.set(self.version_key, int(version)))

    def get_version(self) -> int | None:
        raw = self._call("get_version", lambda: self._redis.get(self.version_key))
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError as e:
            raise ValueError(f"{self.version_key} holds {raw!r}, not an integer version") from e

    def heartbeat(self, generator_id: str, ttl_s: float) -> None:
        """Mark ``generator_id`` alive for ``ttl_s`` seconds (value: the Unix time of the beat)."""
        ttl_ms = max(1, int(ttl_s * 1000))
        key = self.heartbeat_prefix + generator_id
        self._call("heartbeat", lambda: self._redis.set(key, repr(time.time()), px=ttl_ms))

    def live_generators(self) -> list[str]:
        """Ids of generators whose heartbeat key has not expired, sorted."""
        pattern = _glob_escape(self.heartbeat_prefix) + "*"

        def scan() -> list[str]:
            return [
                _entry_id(k)[len(self.heartbeat_prefix) :]
                for k in self._redis.scan_iter(match=pattern, count=1000)
            ]

        return sorted(set(self._call("live_generators", scan)))

    # -- introspection (metrics) --------------------------------------------------------------

    def ledger(self) -> dict[str, int]:
        """The run's ledger: counters written together with issued tasks (see issue_tasks)."""
        raw = self._call("ledger", lambda: self._redis.hgetall(self.ledger_key))
        return {_entry_id(k): int(v) for k, v in raw.items()}

    def backlog(self) -> dict[str, int]:
        """Entries not yet done with, per stream: never delivered plus delivered but
        unacknowledged. Both streams are read in one transaction: a task moving from the
        prompts stream to the rollouts stream in between would otherwise count twice."""
        streams = ((self.prompts_key, TASK_GROUP), (self.rollouts_key, ROLLOUT_GROUP))

        def snapshot() -> list[Any]:
            pipe = self._redis.pipeline(transaction=True)
            for key, _group in streams:
                pipe.xinfo_groups(key)
                # XINFO's own "lag" is unreliable once acknowledged entries are trimmed; the
                # streams hold only live entries, so count what follows the group's cursor.
                pipe.xrange(key, min="-", max="+")
            return list(pipe.execute(raise_on_error=False))

        reply = self._call("backlog", snapshot)
        out: dict[str, int] = {}
        for (name, (_key, group)), groups, entries in zip(
            (("prompts", streams[0]), ("rollouts", streams[1])),
            reply[0::2],
            reply[1::2],
            strict=True,
        ):
            out[name] = 0
            if isinstance(groups, Exception) or isinstance(entries, Exception):
                continue  # the stream does not exist yet
            for g in groups:
                gname = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if gname == group:
                    last = _id_key(_entry_id(g["last-delivered-id"]))
                    lag = sum(1 for eid, _ in entries if _id_key(_entry_id(eid)) > last)
                    out[name] = lag + int(g["pending"])
        return out

    def stream_lengths(self) -> dict[str, int]:
        """XLEN of the prompts, rollouts and dlq streams."""

        def lengths() -> list[int]:
            pipe = self._redis.pipeline(transaction=False)
            for key in (self.prompts_key, self.rollouts_key, self.dlq_key):
                pipe.xlen(key)
            return list(pipe.execute())

        p, r, d = self._call("stream_lengths", lengths)
        return {"prompts": int(p), "rollouts": int(r), "dlq": int(d)}

    def pending_counts(self) -> dict[str, int]:
        """Delivered but unacknowledged entries of the prompts and rollouts streams."""

        def pending(key: str, group: str) -> int:
            try:
                return int(self._redis.xpending(key, group)["pending"])
            except redis.exceptions.ResponseError as e:
                if str(e).startswith("NOGROUP"):
                    return 0
                raise

        return {
            "prompts": self._call("pending", lambda: pending(self.prompts_key, TASK_GROUP)),
            "rollouts": self._call("pending", lambda: pending(self.rollouts_key, ROLLOUT_GROUP)),
        }


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

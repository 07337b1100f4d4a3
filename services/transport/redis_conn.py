"""The Redis connection of one run: keys, bounded retries, run state and introspection.

``RedisConnection`` is what every lpreg process shares about a run's Redis: the key layout, the
connection with its retries (a first contact gives up after ``connect_retries``; afterwards an
outage of up to ``outage_tolerance_s`` is ridden through; both end in
:class:`TransportUnavailable`), the consumer groups,
the policy version, generator heartbeats, the issuer's ledger and the backlog snapshot. Stream
delivery (reading, publishing, acking, dead-lettering) is built on it in
``services.transport.redis_streams``.

Keys of run R:

    lpreg:R:prompts    prompt tasks, consumer group "generators"
    lpreg:R:rollouts   rollout groups, consumer group "learner"
    lpreg:R:dlq        entries that failed to decode or validate, with the reason
    lpreg:R:version    current policy version
    lpreg:R:gen:<id>   generator heartbeat, expires after its TTL
    lpreg:R:ledger     issuer counters, moved in the same transaction as the issued tasks
    lpreg:R:issued     task id -> what was asked for, for every issued task not yet retired

Trimming. Prompt and rollout entries are never capped with XADD MAXLEN: a cap drops the oldest
entries whether or not they were acked, and a learner that falls behind (or a generator pool that
is down) would silently lose tasks or groups. Instead :meth:`RedisConnection.trim_acknowledged`
deletes only entries that every consumer group has been delivered and acked (XTRIM MINID below the
oldest pending and the first undelivered entry). Only the dead-letter stream, which is diagnostic,
is capped at ``RedisConfig.stream_maxlen`` (approximately).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.retry import backoff_delays, retry_call

if TYPE_CHECKING:
    from lpreg_core.config import RedisConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

TASK_GROUP = "generators"
ROLLOUT_GROUP = "learner"

_RETRYABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# The backoff sequence is only a ramp to retry_backoff_max_s; the outage window ends the retries.
_MAX_OUTAGE_ATTEMPTS = 64


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


def entry_id_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = (int(p) for p in entry_id.split("-"))
    return f"{ms + 1}-0" if seq == 2**64 - 1 else f"{ms}-{seq + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisConnection:
    """One run's Redis: connection with bounded retries, consumer groups, run state, ledger.

    ``url`` overrides ``config.url`` (e.g. with LPREG_REDIS_URL); ``password`` is used unless the
    URL carries one. Every method may be called from any thread.
    """

    def __init__(
        self,
        config: RedisConfig,
        run_id: str,
        *,
        password: str | None = None,
        url: str | None = None,
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 60.0,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.url = url if url is not None else config.url
        self.safe_url = redact_url(self.url)
        prefix = f"lpreg:{run_id}"
        self.prompts_key = f"{prefix}:prompts"
        self.rollouts_key = f"{prefix}:rollouts"
        self.dlq_key = f"{prefix}:dlq"
        self.version_key = f"{prefix}:version"
        self.heartbeat_prefix = f"{prefix}:gen:"
        self.ledger_key = f"{prefix}:ledger"
        self.issued_key = f"{prefix}:issued"
        self.socket_timeout_s = socket_timeout_s
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
        self._lock = threading.Lock()
        self.num_retries = 0
        # Until Redis has answered once, failures are more likely a wrong URL than an outage:
        # the first contact gives up after connect_retries, later ones ride through outages.
        self._reached = False

    # -- plumbing -----------------------------------------------------------------------------

    def _on_retry(self, op: str, attempt: int, error: BaseException, delay_s: float) -> None:
        with self._lock:
            self.num_retries += 1
            self._after_retry()
        # An outage of minutes must not bury the log: the first tries, then every tenth.
        log = logger.warning if attempt <= 3 or attempt % 10 == 0 else logger.debug
        log("redis %s: %s (%s); retry %d in %.2fs", op, error, self.safe_url, attempt, delay_s)

    def _after_retry(self) -> None:
        """Called (under the lock) before each retry; subclasses reset read cursors here."""

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying on connection errors; recreate lost consumer groups.

        Before Redis has ever answered, ``connect_retries`` retries are made (a wrong URL fails
        in seconds). Afterwards an operation retries for ``outage_tolerance_s`` with backoff
        capped at ``retry_backoff_max_s``, so a Redis restart or failover of that length is
        ridden through; then TransportUnavailable.
        """
        if self._reached:
            return self._call_through_outage(op, fn)
        attempts = self.config.connect_retries + 1
        once = self._once(op, fn)
        try:
            result = retry_call(
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
        self._reached = True
        return result

    def _call_through_outage(self, op: str, fn: Callable[[], T]) -> T:
        once = self._once(op, fn)
        tolerance_s = self.config.outage_tolerance_s
        deadline = time.monotonic() + tolerance_s
        delays = backoff_delays(
            _MAX_OUTAGE_ATTEMPTS,
            base_s=self.config.retry_backoff_s,
            max_s=self.config.retry_backoff_max_s,
            jitter=True,
        )
        attempt = 1
        while True:
            try:
                return once()
            except _RETRYABLE as e:
                delay = next(delays, self.config.retry_backoff_max_s)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportUnavailable(
                        f"Redis at {self.safe_url} is unreachable: {op} kept failing for "
                        f"{tolerance_s:.0f}s (redis.outage_tolerance_s), {attempt} tries "
                        f"(last error: {e})"
                    ) from e
                delay = min(delay, remaining)
                self._on_retry(op, attempt, e, delay)
                time.sleep(delay)
                attempt += 1

    def _once(self, op: str, fn: Callable[[], T]) -> Callable[[], T]:
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

        return once

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
        logger.info("connected to redis at %s (run %s)", self.safe_url, self.run_id)

    def ensure_groups(self) -> None:
        """Create both streams and their consumer groups; idempotent."""
        self._call("ensure_groups", self._create_groups)

    def close(self) -> None:
        self._redis.close()

    # -- trimming -----------------------------------------------------------------------------

    def _safe_min_id(self, key: str) -> str | None:
        """The smallest id that some consumer group still needs (pending or not yet delivered);
        entries below it are safe to delete. None when nothing can be deleted."""
        groups = self._redis.xinfo_groups(key)
        bound: tuple[int, int] | None = None
        for g in groups:
            last = entry_id_str(g["last-delivered-id"])
            if last == "0-0":
                return None
            needed = _next_id(last)
            if int(g["pending"]) > 0:
                summary = self._redis.xpending(key, g["name"])
                if summary["min"] is not None:
                    needed = entry_id_str(summary["min"])
            k = _id_key(needed)
            bound = k if bound is None or k < bound else bound
        if bound is None:
            return None
        return f"{bound[0]}-{bound[1]}"

    def trim_acknowledged(self) -> dict[str, int]:
        """Delete entries of the prompt and rollout streams that every consumer group has acked;
        returns how many were deleted per stream. Trimming is exact (not ``~``): an internal node
        that also holds a deleted entry (a publish that lost its task, see redis_streams) could
        otherwise not be dropped until later entries were acked too."""
        return {
            "prompts": self._trim(self.prompts_key),
            "rollouts": self._trim(self.rollouts_key),
        }

    def _trim(self, key: str) -> int:
        def trim() -> int:
            min_id = self._safe_min_id(key)
            if min_id is None:
                return 0
            return int(self._redis.xtrim(key, minid=min_id, approximate=False))

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
                entry_id_str(k)[len(self.heartbeat_prefix) :]
                for k in self._redis.scan_iter(match=pattern, count=1000)
            ]

        return sorted(set(self._call("live_generators", scan)))

    # -- introspection (metrics) --------------------------------------------------------------

    def ledger(self) -> dict[str, int]:
        """The run's ledger: counters written together with issued tasks (see issue_tasks)."""
        raw = self._call("ledger", lambda: self._redis.hgetall(self.ledger_key))
        return {entry_id_str(k): int(v) for k, v in raw.items()}

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
                    last = _id_key(entry_id_str(g["last-delivered-id"]))
                    lag = sum(1 for eid, _ in entries if _id_key(entry_id_str(eid)) > last)
                    out[name] = lag + int(g["pending"])
        return out

    def undelivered(self) -> dict[str, int | None]:
        """XINFO GROUPS ``lag`` of each stream's consumer group: cheap (no entries read), but
        None when Redis cannot compute it (e.g. after entries were deleted out of order)."""
        streams = (
            ("prompts", self.prompts_key, TASK_GROUP),
            ("rollouts", self.rollouts_key, ROLLOUT_GROUP),
        )

        def lags() -> dict[str, int | None]:
            out: dict[str, int | None] = {}
            for name, key, group in streams:
                out[name] = None
                try:
                    groups = self._redis.xinfo_groups(key)
                except redis.exceptions.ResponseError:
                    continue  # the stream does not exist yet
                for g in groups:
                    if entry_id_str(g["name"]) == group:
                        lag = g.get("lag")
                        out[name] = None if lag is None else int(lag)
            return out

        return self._call("undelivered", lags)

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

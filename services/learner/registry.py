"""The learner's view of its generators: sessions, liveness, event queues and weight-load reports.

Pure in-process logic behind the LearnerControl servicer, thread-safe, with an injectable clock so
unit tests can move time. One lock guards everything; each session has its own condition on it so
an event wakes only the stream it is for.

Lifecycle of a generator:
  register()  -> a new session (uuid4 hex). A re-registration replaces the old session: its event
                 stream ends, its queued events and load report are dropped, and the generator is
                 no longer a broadcast member, so the next publish starts a new group epoch.
  heartbeat() -> keeps it alive (within heartbeat_ttl_s) and records what it has loaded.
  events()    -> the Control stream: blocks on the session's queue.
  report_loaded() / wait_loaded() -> the acks of a weight publish.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

from lpreg_core.wire.lpreg.v1 import control_pb2
from services.common.errors import InvalidArgument, Unavailable, UnknownGenerator

logger = logging.getLogger(__name__)

# Ids prefix Redis keys and label metrics, so they are kept to a safe alphabet. \Z, not $: `$`
# also matches before a final newline, which would let "gen-0\n" through.
GENERATOR_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
# Bounds on what a Register call may claim: each worker is a rank of the next broadcast group, so
# a huge num_workers would make every join wait for ranks that never come (and 2**32 - 1
# overflowed the group's world size). Tensor-parallel generators have at most a node's GPUs.
MAX_WORKERS_PER_GENERATOR = 64
# Backend and device names ("hf", "vllm", "cpu", "cuda:0") label metrics and logs.
_NAME_PATTERN = re.compile(r"\A[A-Za-z0-9_.:-]{1,32}\Z")
# A DNS name is at most 253 characters; an address literal is shorter.
MAX_HOST_LENGTH = 255
MAX_VOCAB_SIZE = 1 << 24
# How often a blocked stream re-checks whether its RPC is still active: a cancelled Control call
# frees its worker thread within this time.
STREAM_POLL_S = 0.2
# A session whose stream never reconnects must not grow learner memory without bound; events are
# small and membership changes drop dead members long before this fills.
MAX_QUEUED_EVENTS = 1024

# What events() returns; closing it detaches the stream at once.
EventStream = Generator[control_pb2.ControlEvent, None, None]


@dataclass(frozen=True)
class GeneratorInfo:
    """A generator as the learner sees it at one instant."""

    generator_id: str
    session_id: str
    backend: str
    num_workers: int
    vocab_size: int
    device: str
    host: str
    loaded_version: int
    loaded_checksum: str
    tokens_generated: int
    in_flight: int
    # Heartbeat within the ttl and Control stream connected.
    alive: bool
    connected: bool
    member: bool
    # Group epoch this generator is a member of (meaningful only when member is true).
    epoch: int
    last_heartbeat_age_s: float


@dataclass(frozen=True)
class LoadReport:
    """One generator's answer to a weight publish."""

    generator_id: str
    version: int
    checksum: str
    ok: bool
    error: str
    load_s: float


@dataclass(eq=False)
class _Session:
    generator_id: str
    session_id: str
    backend: str
    num_workers: int
    vocab_size: int
    device: str
    host: str
    last_heartbeat: float
    wakeup: threading.Condition
    queue: deque[control_pb2.ControlEvent] = field(default_factory=deque)
    loaded_version: int = 0
    loaded_checksum: str = ""
    tokens_generated: int = 0
    in_flight: int = 0
    member: bool = False
    epoch: int = 0
    report: LoadReport | None = None
    # Identity of the attached Control stream; a newer stream of the same session replaces it.
    stream: object | None = None


class GeneratorRegistry:
    """Registered generators of one learner process (see the module docstring)."""

    def __init__(
        self,
        heartbeat_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        expected_vocab_size: int | None = None,
    ) -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be > 0, got {heartbeat_ttl_s}")
        self._ttl_s = heartbeat_ttl_s
        self._clock = clock
        self._expected_vocab_size = expected_vocab_size
        self._lock = threading.Lock()
        self._loaded = threading.Condition(self._lock)
        self._sessions: dict[str, _Session] = {}
        self._seq = 0
        self._epoch = 0
        self._closed_reason: str | None = None

    # -- registration and liveness ---------------------------------------------------------------

    def register(
        self,
        generator_id: str,
        backend: str,
        num_workers: int,
        vocab_size: int,
        device: str,
        host: str = "",
    ) -> GeneratorInfo:
        """Start a new session for ``generator_id``, replacing any previous one."""
        if not GENERATOR_ID_PATTERN.match(generator_id):
            raise InvalidArgument(
                f"generator_id {generator_id!r} must match {GENERATOR_ID_PATTERN.pattern}"
            )
        if not 1 <= num_workers <= MAX_WORKERS_PER_GENERATOR:
            raise InvalidArgument(
                f"generator {generator_id}: num_workers must be in 1..{MAX_WORKERS_PER_GENERATOR}"
                f", got {num_workers}"
            )
        for name, value in (("backend", backend), ("device", device)):
            if not _NAME_PATTERN.match(value):
                raise InvalidArgument(
                    f"generator {generator_id}: {name} {value[:80]!r} must match "
                    f"{_NAME_PATTERN.pattern}"
                )
        if len(host) > MAX_HOST_LENGTH or not host.isprintable():
            raise InvalidArgument(
                f"generator {generator_id}: host must be printable and at most "
                f"{MAX_HOST_LENGTH} characters ({len(host)} given)"
            )
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise InvalidArgument(
                f"generator {generator_id}: vocab_size must be in 1..{MAX_VOCAB_SIZE}, "
                f"got {vocab_size}"
            )
        if self._expected_vocab_size is not None and vocab_size != self._expected_vocab_size:
            raise InvalidArgument(
                f"generator {generator_id} has vocab_size {vocab_size} but the learner's model has "
                f"{self._expected_vocab_size}: both must load the same model"
            )
        with self._lock:
            if self._closed_reason is not None:
                raise Unavailable(f"learner is shutting down ({self._closed_reason})")
            old = self._sessions.get(generator_id)
            session = _Session(
                generator_id=generator_id,
                session_id=uuid.uuid4().hex,
                backend=backend,
                num_workers=num_workers,
                vocab_size=vocab_size,
                device=device,
                host=host,
                last_heartbeat=self._clock(),
                wakeup=threading.Condition(self._lock),
            )
            self._sessions[generator_id] = session
            if old is not None:
                old.wakeup.notify_all()
                self._loaded.notify_all()
            info = self._info(session)
        if old is None:
            logger.info(
                "generator %s registered (backend=%s, workers=%d, device=%s)",
                generator_id,
                backend,
                num_workers,
                device,
            )
        else:
            logger.info(
                "generator %s re-registered; session %s replaced%s",
                generator_id,
                old.session_id,
                " while its stream was still connected (two processes with one id?)"
                if old.stream is not None
                else "",
            )
        return info

    def heartbeat(
        self,
        generator_id: str,
        session_id: str,
        loaded_version: int,
        tokens_generated: int,
        in_flight: int,
    ) -> None:
        with self._lock:
            session = self._current(generator_id, session_id)
            session.last_heartbeat = self._clock()
            session.loaded_version = loaded_version
            session.tokens_generated = tokens_generated
            session.in_flight = in_flight

    def remove(self, generator_id: str) -> bool:
        """Forget a generator (its stream ends); False if it was not registered."""
        with self._lock:
            session = self._sessions.pop(generator_id, None)
            if session is None:
                return False
            session.wakeup.notify_all()
            self._loaded.notify_all()
        logger.info("generator %s removed", generator_id)
        return True

    # -- control events ----------------------------------------------------------------------------

    def events(
        self, generator_id: str, session_id: str, is_active: Callable[[], bool]
    ) -> EventStream:
        """The session's events, blocking between them.

        Raises UnknownGenerator at once for an unknown id or stale session. The iterator ends when
        a newer registration or a newer stream of this session replaces it, the generator is
        removed, the registry is closed (after the pending events, Shutdown included, are yielded),
        or ``is_active()`` turns false (checked every STREAM_POLL_S while idle).
        """
        with self._lock:
            session = self._current(generator_id, session_id)
        return self._stream(session, is_active)

    def _stream(self, session: _Session, is_active: Callable[[], bool]) -> EventStream:
        token = object()
        with self._lock:
            session.stream = token
            session.wakeup.notify_all()
        try:
            while True:
                with self._lock:
                    if self._sessions.get(session.generator_id) is not session:
                        return
                    if session.stream is not token:
                        return
                    event = session.queue.popleft() if session.queue else None
                    if event is None:
                        if self._closed_reason is not None:
                            return
                        session.wakeup.wait(STREAM_POLL_S)
                if event is not None:
                    yield event
                elif not is_active():
                    return
        finally:
            with self._lock:
                if session.stream is token:
                    session.stream = None

    def send(self, generator_id: str, event: control_pb2.ControlEvent) -> int:
        """Queue ``event`` for the generator's current session; returns the assigned seq."""
        with self._lock:
            session = self._sessions.get(generator_id)
            if session is None:
                raise UnknownGenerator(f"generator {generator_id} is not registered")
            stamped = self._stamp(event)
            self._enqueue(session, stamped)
            return stamped.seq

    def send_all(
        self, event: control_pb2.ControlEvent, generator_ids: Iterable[str] | None = None
    ) -> list[str]:
        """Queue one event (one seq) for each listed generator, or every registered one when
        ``generator_ids`` is None; returns the ids it was queued for (unknown ids are skipped)."""
        with self._lock:
            ids = (
                list(self._sessions)
                if generator_ids is None
                else list(dict.fromkeys(generator_ids))
            )
            stamped = self._stamp(event)
            queued = []
            for generator_id in ids:
                session = self._sessions.get(generator_id)
                if session is not None:
                    self._enqueue(session, stamped)
                    queued.append(generator_id)
            return queued

    def _stamp(self, event: control_pb2.ControlEvent) -> control_pb2.ControlEvent:
        self._seq += 1
        stamped = control_pb2.ControlEvent()
        stamped.CopyFrom(event)
        stamped.seq = self._seq
        return stamped

    def _enqueue(self, session: _Session, event: control_pb2.ControlEvent) -> None:
        if len(session.queue) >= MAX_QUEUED_EVENTS:
            dropped = session.queue.popleft()
            logger.warning(
                "generator %s: %d undelivered events, dropping seq %d (%s)",
                session.generator_id,
                len(session.queue) + 1,
                dropped.seq,
                dropped.WhichOneof("event"),
            )
        session.queue.append(event)
        session.wakeup.notify_all()

    # -- weight loads --------------------------------------------------------------------------------

    def report_loaded(
        self,
        generator_id: str,
        session_id: str,
        version: int,
        checksum: str,
        ok: bool,
        error: str,
        load_s: float,
    ) -> LoadReport:
        report = LoadReport(generator_id, version, checksum, ok, error, load_s)
        with self._lock:
            session = self._current(generator_id, session_id)
            # Reports can overtake each other; the newest version is the one that counts.
            if session.report is None or version >= session.report.version:
                session.report = report
            if ok and version >= session.loaded_version:
                session.loaded_version = version
                session.loaded_checksum = checksum
            self._loaded.notify_all()
        if not ok:
            logger.warning(
                "generator %s failed to load version %d: %s", generator_id, version, error
            )
        return report

    def wait_loaded(
        self, version: int, generator_ids: Iterable[str], timeout_s: float
    ) -> dict[str, LoadReport]:
        """Reports of ``version`` or newer from the listed generators, keyed by id.

        Returns when each listed generator has reported (successfully or not), can no longer
        report (not registered, removed, or re-registered since the call: its new session is not
        a member), the registry is closed, or ``timeout_s`` has passed on the registry's clock.
        Generators missing from the result did not report in time.
        """
        with self._lock:
            deadline = self._clock() + timeout_s
            waiting = {
                gid: s for gid in dict.fromkeys(generator_ids) if (s := self._sessions.get(gid))
            }
            while True:
                reports: dict[str, LoadReport] = {}
                pending = False
                for generator_id, session in waiting.items():
                    if self._sessions.get(generator_id) is not session:
                        continue
                    if session.report is not None and session.report.version >= version:
                        reports[generator_id] = session.report
                    else:
                        pending = True
                remaining = deadline - self._clock()
                if not pending or remaining <= 0 or self._closed_reason is not None:
                    return reports
                self._loaded.wait(min(remaining, STREAM_POLL_S))

    def loaded_versions(self) -> dict[str, int]:
        with self._lock:
            return {gid: s.loaded_version for gid, s in self._sessions.items()}

    # -- membership and views ---------------------------------------------------------------------

    def mark_members(self, generator_ids: Iterable[str], epoch: int) -> list[str]:
        """Make exactly these generators the broadcast members of group ``epoch``; returns the ids
        marked (unknown ids are skipped)."""
        wanted = set(generator_ids)
        with self._lock:
            self._epoch = epoch
            marked = []
            for generator_id, session in self._sessions.items():
                session.member = generator_id in wanted
                if session.member:
                    session.epoch = epoch
                    marked.append(generator_id)
            return sorted(marked)

    @property
    def epoch(self) -> int:
        """The group epoch of the last mark_members call."""
        with self._lock:
            return self._epoch

    def members(self) -> list[GeneratorInfo]:
        return [info for info in self.snapshot() if info.member]

    def alive(self) -> list[GeneratorInfo]:
        """Generators heard from within the heartbeat ttl whose Control stream is connected."""
        return [info for info in self.snapshot() if info.alive]

    def snapshot(self) -> list[GeneratorInfo]:
        """Every registered generator, sorted by id (the order broadcast ranks are assigned in)."""
        with self._lock:
            return [self._info(self._sessions[gid]) for gid in sorted(self._sessions)]

    def get(self, generator_id: str) -> GeneratorInfo | None:
        with self._lock:
            session = self._sessions.get(generator_id)
            return None if session is None else self._info(session)

    # -- shutdown ------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Send Shutdown to every generator and end every stream once it has been delivered;
        registration is refused from now on. Idempotent."""
        with self._lock:
            if self._closed_reason is not None:
                return
            self._closed_reason = reason
            shutdown = self._stamp(
                control_pb2.ControlEvent(shutdown=control_pb2.Shutdown(reason=reason))
            )
            for session in self._sessions.values():
                self._enqueue(session, shutdown)
            self._loaded.notify_all()
        logger.info("generator registry closed: %s", reason)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed_reason is not None

    # -- internals (lock held) ------------------------------------------------------------------------

    def _current(self, generator_id: str, session_id: str) -> _Session:
        session = self._sessions.get(generator_id)
        if session is None:
            raise UnknownGenerator(f"generator {generator_id!r} is not registered")
        if session.session_id != session_id:
            raise UnknownGenerator(
                f"generator {generator_id!r}: session {session_id!r} was replaced by a newer "
                "registration"
            )
        return session

    def _info(self, session: _Session) -> GeneratorInfo:
        age = max(0.0, self._clock() - session.last_heartbeat)
        connected = session.stream is not None
        return GeneratorInfo(
            generator_id=session.generator_id,
            session_id=session.session_id,
            backend=session.backend,
            num_workers=session.num_workers,
            vocab_size=session.vocab_size,
            device=session.device,
            host=session.host,
            loaded_version=session.loaded_version,
            loaded_checksum=session.loaded_checksum,
            tokens_generated=session.tokens_generated,
            in_flight=session.in_flight,
            alive=connected and age <= self._ttl_s,
            connected=connected,
            member=session.member,
            epoch=session.epoch,
            last_heartbeat_age_s=age,
        )

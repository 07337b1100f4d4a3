"""A generator's side of the control plane: register, heartbeat, follow the Control stream, ack
weight loads.

The learner may restart at any time. Unary calls retry with bounded exponential backoff while it is
unreachable; ``events()`` reconnects and re-registers after a broken stream and keeps yielding, so
the consumer simply sees a new JoinGroup once the learner includes this generator again. Status
codes come back as the domain errors of services.common.errors (NOT_FOUND = UnknownGenerator:
this session is unknown to the learner, the cure is to register again).

Typical use in the generator service:

    client = ControlClient(config.control, generator_id="gen-0", backend="hf", num_workers=1,
                           vocab_size=vocab, device="cpu", auth_token=token)
    client.register()
    client.start_heartbeats(lambda: (loaded_version, tokens_generated, in_flight))
    for event in client.events():      # ends after Shutdown or close()
        ...
        client.report_loaded(version, checksum, ok=True, load_s=seconds)
    client.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from lpreg_core.config import ControlConfig
from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc
from services.common.auth import bearer_metadata
from services.common.errors import ControlError, Unavailable
from services.common.grpc_status import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    PEER_LIMIT_DETAILS,
    SERVER_LIMIT_DETAILS,
    error_from_rpc,
)
from services.common.retry import retry_call

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Codes that mean "the learner is not there right now" (down or restarting). RESOURCE_EXHAUSTED
# is not among them: it mostly means a message over the size limit, which no retry fixes; only a
# concurrency limit (see is_retryable) passes as other calls end.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_BUSY_DETAILS = (PEER_LIMIT_DETAILS, SERVER_LIMIT_DETAILS)


def is_retryable(err: grpc.RpcError) -> bool:
    """Whether a failed call may succeed if tried again: the learner is down or restarting, or
    it refused the call for a concurrency limit (not for a message too large)."""
    if not isinstance(err, grpc.Call):
        return False
    code = err.code()
    if code in RETRYABLE_CODES:
        return True
    details = err.details() or ""
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_BUSY_DETAILS)


# Largest exponent of the stream-reconnect backoff; the delay is capped long before this anyway.
_MAX_BACKOFF_EXPONENT = 30


class _Retryable(Exception):
    def __init__(self, err: grpc.RpcError) -> None:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        super().__init__(f"{getattr(code, 'name', 'UNKNOWN')}: {details}")
        self.rpc_error = err


class ClientClosed(RuntimeError):
    """The ControlClient was closed while (or before) a call was made."""


class ControlClient:
    """Control-plane client of one generator process (see the module docstring).

    Settings come from ``ControlConfig``: ``retry_attempts`` is the number of tries of one call
    in total; waits between tries grow from ``retry_backoff_s`` by doubling up to
    ``retry_backoff_max_s``. TLS is used when ``tls_ca_file`` is set (the CA bundle that signed
    the learner's certificate); ``tls_server_name`` overrides the name checked against the
    certificate when the address is not that name. ``address`` overrides
    ``config.learner_address`` (e.g. from LPREG_LEARNER_ADDRESS).
    """

    def __init__(
        self,
        config: ControlConfig,
        *,
        generator_id: str,
        backend: str,
        num_workers: int,
        vocab_size: int,
        device: str,
        auth_token: str | None,
        address: str | None = None,
        tls_server_name: str | None = None,
        rpc_timeout_s: float = 10.0,
        host: str = "",
        run_id: str = "",
    ) -> None:
        self.address = address if address is not None else config.learner_address
        self.generator_id = generator_id
        self._register_request = control_pb2.RegisterRequest(
            generator_id=generator_id,
            backend=backend,
            num_workers=num_workers,
            host=host,
            vocab_size=vocab_size,
            device=device,
            run_id=run_id,
        )
        self._metadata = bearer_metadata(auth_token)
        self._retry_attempts = config.retry_attempts
        backoff_base_s = self._backoff_base_s = config.retry_backoff_s
        backoff_max_s = self._backoff_max_s = config.retry_backoff_max_s
        self._rpc_timeout_s = rpc_timeout_s
        max_message_bytes = config.max_message_bytes
        tls_ca_file = config.tls_ca_file
        address = self.address

        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC's own reconnect backoff grows to minutes by default; keep it within ours so a
            # restarted learner is found as soon as our retries look for it.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff_base_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(backoff_max_s * 1000))),
        ]
        if tls_ca_file is not None:
            try:
                ca = Path(tls_ca_file).read_bytes()
            except OSError as e:
                raise OSError(f"cannot read the control-plane CA bundle {tls_ca_file}: {e}") from e
            if tls_server_name is not None:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = control_pb2_grpc.LearnerControlStub(self._channel)

        self._lock = threading.Lock()
        # Serialises registrations so the heartbeat thread and the event loop, both noticing a
        # learner restart, register once between them.
        self._register_lock = threading.RLock()
        self._closed = threading.Event()
        self._session: control_pb2.RegisterResponse | None = None
        self._registrations = 0
        self._learner_version = 0
        self._last_contact = float("-inf")
        self._stream_call: grpc.Call | None = None
        self._heartbeat_thread: threading.Thread | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        with self._lock:
            return None if self._session is None else self._session.session_id

    @property
    def registrations(self) -> int:
        """Successful registrations so far (the first plus every re-registration)."""
        with self._lock:
            return self._registrations

    @property
    def learner_version(self) -> int:
        """The learner's policy version as of the last registration or heartbeat."""
        with self._lock:
            return self._learner_version

    @property
    def seconds_since_contact(self) -> float:
        """Time since the learner last answered a registration or heartbeat."""
        with self._lock:
            return time.monotonic() - self._last_contact

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- unary calls ---------------------------------------------------------------------------------

    def register(self) -> control_pb2.RegisterResponse:
        """Register (again): a new session. Retries while the learner is unreachable; raises
        Unavailable after the last try, and the mapped ControlError for a refusal (wrong token,
        vocabulary mismatch)."""
        with self._register_lock:
            response: control_pb2.RegisterResponse = self._call(
                "Register",
                lambda: self._stub.Register(
                    self._register_request, timeout=self._rpc_timeout_s, metadata=self._metadata
                ),
            )
            with self._lock:
                self._session = response
                self._registrations += 1
                self._learner_version = response.current_version
                self._last_contact = time.monotonic()
        logger.info(
            "registered with learner %s as %s (session %s, run %s, version %d)",
            self.address,
            self.generator_id,
            response.session_id,
            response.run_id,
            response.current_version,
        )
        return response

    def report_loaded(
        self, version: int, checksum: str, ok: bool = True, error: str = "", load_s: float = 0.0
    ) -> bool:
        """Tell the learner which weights this generator now serves; returns the learner's
        ``accepted``. Raises UnknownGenerator when the session is stale (the learner restarted or
        replaced it; the re-registration that follows brings a new JoinGroup)."""
        report = control_pb2.WeightsLoadedReport(
            generator_id=self.generator_id,
            session_id=self._require_session(),
            version=version,
            checksum=checksum,
            load_s=load_s,
            ok=ok,
            error=error,
        )
        ack: control_pb2.ReportAck = self._call(
            "ReportWeightsLoaded",
            lambda: self._stub.ReportWeightsLoaded(
                report, timeout=self._rpc_timeout_s, metadata=self._metadata
            ),
        )
        return ack.accepted

    def status(self) -> control_pb2.StatusResponse:
        response: control_pb2.StatusResponse = self._call(
            "GetStatus",
            lambda: self._stub.GetStatus(
                control_pb2.StatusRequest(), timeout=self._rpc_timeout_s, metadata=self._metadata
            ),
        )
        return response

    # -- heartbeats ----------------------------------------------------------------------------------

    def start_heartbeats(
        self, get_state: Callable[[], tuple[int, int, int]], interval_s: float | None = None
    ) -> None:
        """Heartbeat from a daemon thread every ``interval_s`` (default: the interval the learner
        gave at registration). ``get_state()`` returns (loaded_version, tokens_generated,
        in_flight). A heartbeat the learner answers with NOT_FOUND triggers a re-registration."""
        with self._lock:
            if self._heartbeat_thread is not None:
                raise RuntimeError("heartbeats are already running")
            if interval_s is None:
                if self._session is None:
                    raise RuntimeError("register() before start_heartbeats() without interval_s")
                interval_s = self._session.heartbeat_interval_s
            if interval_s <= 0:
                raise ValueError(f"heartbeat interval must be > 0, got {interval_s}")
            thread = threading.Thread(
                target=self._heartbeat_loop,
                args=(get_state, interval_s),
                name=f"lpreg-heartbeat-{self.generator_id}",
                daemon=True,
            )
            self._heartbeat_thread = thread
        thread.start()

    def _heartbeat_loop(
        self, get_state: Callable[[], tuple[int, int, int]], interval_s: float
    ) -> None:
        failing = False
        while not self._closed.wait(interval_s):
            session_id = self.session_id
            if session_id is None:
                continue
            try:
                loaded_version, tokens_generated, in_flight = get_state()
            except Exception:
                # A bug in the callback must not silently end the heartbeats of a healthy generator.
                logger.exception("heartbeat state callback failed; skipping this heartbeat")
                continue
            request = control_pb2.HeartbeatRequest(
                generator_id=self.generator_id,
                session_id=session_id,
                loaded_version=loaded_version,
                tokens_generated=tokens_generated,
                in_flight=in_flight,
            )
            try:
                response = self._stub.Heartbeat(
                    request, timeout=self._rpc_timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as err:
                if self._closed.is_set():
                    return
                failing = self._on_heartbeat_error(err, session_id, failing)
                continue
            except ValueError:
                # The channel was closed under us: close() is running.
                if self._closed.is_set():
                    return
                raise
            if failing:
                logger.info("heartbeats to %s succeed again", self.address)
                failing = False
            with self._lock:
                self._learner_version = response.current_version
                self._last_contact = time.monotonic()

    def _on_heartbeat_error(self, err: grpc.RpcError, session_id: str, failing: bool) -> bool:
        """Handle one failed heartbeat; returns whether heartbeats are now failing."""
        code = err.code() if isinstance(err, grpc.Call) else None
        if code is not grpc.StatusCode.NOT_FOUND:
            # Once per outage: a learner that is down for minutes must not flood the log.
            log = logger.debug if failing else logger.warning
            log("heartbeat to %s failed: %s", self.address, error_from_rpc(err, "Heartbeat"))
            return True
        logger.warning(
            "learner %s does not know session %s; registering again", self.address, session_id
        )
        try:
            self._reregister(session_id)
        except ClientClosed:
            return failing
        except ControlError as e:
            logger.warning("re-registration failed; trying again at the next heartbeat: %s", e)
            return True
        return False

    # -- control events ------------------------------------------------------------------------------

    def events(self) -> Iterator[control_pb2.ControlEvent]:
        """Control events for this generator, across learner restarts.

        Registers first if needed. After a broken or ended stream it waits with backoff,
        registers again and reattaches. A Shutdown event closes the client (heartbeats stop)
        and is the last event yielded; close() from another thread ends the iterator as well.
        Raises Unavailable when the learner stays unreachable through a whole registration retry
        sequence, and the mapped ControlError for a refusal (e.g. Unauthenticated).
        """
        failures = 0
        while not self._closed.is_set():
            try:
                session_id = self.session_id or self.register().session_id
            except ClientClosed:
                return
            request = control_pb2.ControlRequest(
                generator_id=self.generator_id, session_id=session_id
            )
            ended: str
            refused = False
            try:
                call = self._stub.Control(request, metadata=self._metadata)
            except ValueError:
                if self._closed.is_set():
                    return
                raise
            with self._lock:
                self._stream_call = call
            if self._closed.is_set():
                call.cancel()
            try:
                for event in call:
                    failures = 0
                    if event.HasField("shutdown"):
                        logger.info("learner sent Shutdown: %s", event.shutdown.reason)
                        self.close()
                        yield event
                        return
                    yield event
                ended = "the learner ended the stream"
            except grpc.RpcError as err:
                if self._closed.is_set():
                    return
                code = err.code() if isinstance(err, grpc.Call) else None
                if not is_retryable(err) and code not in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL,
                ):
                    raise error_from_rpc(err, "Control") from err
                refused = code is grpc.StatusCode.NOT_FOUND
                ended = str(error_from_rpc(err, "Control stream"))
            finally:
                with self._lock:
                    if self._stream_call is call:
                        self._stream_call = None

            if self.session_id != session_id:
                # The heartbeat thread registered again meanwhile; attach to that session.
                continue
            failures += 1
            # An unknown session needs a registration now; anything else may be a learner that is
            # going away, which backoff keeps us from hammering.
            delay = 0.0 if refused and failures == 1 else self._backoff_s(failures)
            logger.warning(
                "control stream of session %s ended (%s); registering again in %.2fs",
                session_id,
                ended,
                delay,
            )
            if self._closed.wait(delay):
                return
            try:
                self._reregister(session_id)
            except ClientClosed:
                return

    # -- shutdown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop heartbeats, end the event iterator and close the channel. Idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            call = self._stream_call
            thread = self._heartbeat_thread
        if call is not None:
            call.cancel()
        self._channel.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._rpc_timeout_s)
            if thread.is_alive():
                logger.warning("heartbeat thread did not stop within %.1fs", self._rpc_timeout_s)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------

    def _require_session(self) -> str:
        session_id = self.session_id
        if session_id is None:
            raise RuntimeError("call register() first")
        return session_id

    def _reregister(self, stale_session_id: str) -> str:
        with self._register_lock:
            current = self.session_id
            if current is not None and current != stale_session_id:
                return current
            return self.register().session_id

    def _backoff_s(self, failures: int) -> float:
        exponent = min(failures - 1, _MAX_BACKOFF_EXPONENT)
        return min(self._backoff_max_s, self._backoff_base_s * 2**exponent)

    def _sleep(self, delay_s: float) -> None:
        if self._closed.wait(delay_s):
            raise ClientClosed(f"control client for {self.address} closed while retrying")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._closed.is_set():
            raise ClientClosed(f"{what}: control client for {self.address} is closed")

        def attempt() -> T:
            try:
                return fn()
            except grpc.RpcError as err:
                if self._closed.is_set():
                    raise ClientClosed(f"{what}: control client closed during the call") from err
                if is_retryable(err):
                    raise _Retryable(err) from err
                raise error_from_rpc(err, what) from err
            except ValueError as err:
                if self._closed.is_set():
                    raise ClientClosed(f"{what}: control client closed during the call") from err
                raise

        def on_retry(attempt_number: int, error: BaseException, delay_s: float) -> None:
            logger.info(
                "%s: learner %s not reachable (%s); try %d of %d failed, next in %.2fs",
                what,
                self.address,
                error,
                attempt_number,
                self._retry_attempts,
                delay_s,
            )

        try:
            return retry_call(
                attempt,
                attempts=self._retry_attempts,
                base_s=self._backoff_base_s,
                max_s=self._backoff_max_s,
                retry_on=(_Retryable,),
                on_retry=on_retry,
                jitter=True,
                sleep=self._sleep,
            )
        except _Retryable as e:
            raise Unavailable(
                f"{what}: learner at {self.address} unreachable after {self._retry_attempts} "
                f"tries: {error_from_rpc(e.rpc_error, what)}"
            ) from e.rpc_error

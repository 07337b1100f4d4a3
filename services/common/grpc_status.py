"""The control plane's gRPC plumbing shared by server and client: the one error-to-status
mapping (and back), the authenticating, per-peer-capping interceptor, and channel options
(message sizes, keepalive, connection idle and age limits).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.common.auth import bearer_token_error
from services.common.errors import (
    ControlError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    UnknownGenerator,
)

logger = logging.getLogger(__name__)

# Kubernetes probes carry no token, so the health service is the one thing open to anyone.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

# Pings find peers that vanished without closing the connection (a lost node), so their streams
# end instead of holding a worker; clients ping at KEEPALIVE_TIME_MS, which this minimum admits.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000
MAX_CONNECTION_IDLE_MS = 300_000
MAX_CONNECTION_AGE_MS = 3_600_000
# A generator holds 3 calls at most (Control stream, heartbeat, one other); see
# ControlConfig.max_calls_per_peer.
DEFAULT_MAX_CALLS_PER_PEER = 64
# Details of the RESOURCE_EXHAUSTED a capped peer gets; clients retry it (the cap frees as their
# other calls end), unlike a message over the size limit.
PEER_LIMIT_DETAILS = "too many concurrent calls from this peer"
# gRPC's own words when the server-wide maximum_concurrent_rpcs is reached.
SERVER_LIMIT_DETAILS = "Concurrent RPC limit exceeded"
REFUSAL_LOG_INTERVAL_S = 10.0


_STATUS_FOR_ERROR: dict[type[ControlError], grpc.StatusCode] = {
    UnknownGenerator: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_ERROR_FOR_STATUS = {code: error for error, code in _STATUS_FOR_ERROR.items()}


def status_for(error: ControlError) -> grpc.StatusCode:
    """The status code a domain error is sent as (FAILED_PRECONDITION for an unmapped subclass)."""
    for cls in type(error).__mro__:
        if cls in _STATUS_FOR_ERROR:
            return _STATUS_FOR_ERROR[cls]
    return grpc.StatusCode.FAILED_PRECONDITION


def error_from_rpc(err: grpc.RpcError, what: str) -> ControlError:
    """The domain error for a failed call (the inverse of status_for), with ``what`` as context."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    cls = _ERROR_FOR_STATUS.get(code, ControlError)
    return cls(f"{what}: {code.name}: {details}")


class PeerLimiter:
    """Concurrent calls per peer address, capped: one client cannot hold every worker."""

    def __init__(self, max_calls_per_peer: int) -> None:
        if max_calls_per_peer < 1:
            raise ValueError(f"max_calls_per_peer must be >= 1, got {max_calls_per_peer}")
        self.max_calls_per_peer = max_calls_per_peer
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def acquire(self, peer: str) -> bool:
        with self._lock:
            n = self._calls.get(peer, 0)
            if n >= self.max_calls_per_peer:
                return False
            self._calls[peer] = n + 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            n = self._calls.get(peer, 0) - 1
            if n > 0:
                self._calls[peer] = n
            else:
                self._calls.pop(peer, None)

    def in_use(self, peer: str) -> int:
        with self._lock:
            return self._calls.get(peer, 0)


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"): the
    unit of the per-peer cap, so opening more connections does not buy more calls."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class _ThrottledLog:
    """Refusals logged at most once per ``interval_s``, with the count of those not logged: a
    flood of bad calls must not become a flood of log lines."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval_s
        if suppressed:
            message += f" ({suppressed} more refusals since the last message)"
        logger.warning(message, *args)


class ControlInterceptor(grpc.ServerInterceptor):
    """Authenticates every call except health probes, caps concurrent calls per peer, and maps
    ControlError to status codes.

    A call without a valid token is refused from its metadata alone: the handler returned for it
    aborts at once and never reads (or waits for) the request body, so calls that send headers and
    then nothing hold no worker thread. Admitted calls are served by request-streaming handlers
    that take the per-peer slot before reading the body, so a peer's half-open calls count
    against its cap instead of pinning workers beyond it.
    """

    def __init__(
        self, auth_token: str | None, max_calls_per_peer: int = DEFAULT_MAX_CALLS_PER_PEER
    ) -> None:
        self._auth_token = auth_token
        self.limiter = PeerLimiter(max_calls_per_peer)
        self._refusals = _ThrottledLog()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if self._auth_token is not None and not method.startswith(PUBLIC_METHOD_PREFIXES):
            metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
            reason = bearer_token_error(metadata, self._auth_token)
            if reason is not None:
                return self._refusal(method, reason)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, method, self.limiter)

    def _refusal(self, method: str, reason: str) -> grpc.RpcMethodHandler:
        refusals = self._refusals

        def refuse(_requests: Iterator[Any], context: grpc.ServicerContext) -> None:
            # The request iterator is never advanced: no body is read or parsed.
            refusals.warning("refused %s from %s: %s", method, context.peer(), reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return grpc.stream_unary_rpc_method_handler(refuse)


def _abort(context: grpc.ServicerContext, method: str, error: ControlError) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        logger.warning("refused %s from %s: %s", method, context.peer(), error)
    else:
        logger.info("%s from %s failed with %s: %s", method, context.peer(), code.name, error)
    context.abort(code, str(error))


def _admit(limiter: PeerLimiter, method: str, context: grpc.ServicerContext) -> str:
    """Take a slot of the caller's peer address (returned, to release) or abort the call."""
    peer = peer_address(context.peer())
    if not limiter.acquire(peer):
        logger.info("%s from %s refused: %s", method, context.peer(), PEER_LIMIT_DETAILS)
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{PEER_LIMIT_DETAILS} ({limiter.max_calls_per_peer} from {peer})",
        )
    return peer


def _single_request(requests: Iterator[Any], method: str, context: grpc.ServicerContext) -> Any:
    try:
        return next(requests)
    except StopIteration:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes exactly one request")
        raise  # unreachable: abort raises


def _wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, limiter: PeerLimiter
) -> grpc.RpcMethodHandler:
    """The handler as a request-streaming one: the per-peer slot is taken before the body is
    read; a unary request is then read as the stream's one message."""
    behavior: Callable[[Any, grpc.ServicerContext], Any] = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if behavior is None:
        raise TypeError(f"handler for {method} has no behaviour")
    unary_request = not handler.request_streaming

    def request_of(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return _single_request(requests, method, context) if unary_request else requests

    def unary_response(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        peer = _admit(limiter, method, context)
        try:
            return behavior(request_of(requests, context), context)
        except ControlError as e:
            _abort(context, method, e)
        finally:
            limiter.release(peer)

    def stream_response(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        peer = _admit(limiter, method, context)
        try:
            yield from behavior(request_of(requests, context), context)
        except ControlError as e:
            _abort(context, method, e)
        finally:
            limiter.release(peer)

    serdes = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response, **serdes)
    return grpc.stream_unary_rpc_method_handler(unary_response, **serdes)


def server_options(
    max_message_bytes: int, max_calls_per_peer: int = DEFAULT_MAX_CALLS_PER_PEER
) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # HTTP/2 streams one connection may have open: more wait on the client's side.
        ("grpc.max_concurrent_streams", max_calls_per_peer),
        # Connections without calls are closed (their client reconnects when it needs to) ...
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        # ... and every connection is asked to move on once it is old (GOAWAY); calls in flight,
        # such as a Control stream, keep running: a broken stream would cost a re-registration.
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # Control streams are silent between events; without this, pings stop after two.
        ("grpc.http2.max_pings_without_data", 0),
    ]

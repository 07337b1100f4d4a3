"""The control plane's gRPC plumbing shared by server and client: the one error-to-status
mapping (and back), the authenticating interceptor, and channel options (message sizes, keepalive).
"""

from __future__ import annotations

import logging
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


class ControlInterceptor(grpc.ServerInterceptor):
    """Authenticates every call except health probes and maps ControlError to status codes."""

    def __init__(self, auth_token: str | None) -> None:
        self._auth_token = auth_token

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        refusal: Unauthenticated | None = None
        if self._auth_token is not None and not method.startswith(PUBLIC_METHOD_PREFIXES):
            metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
            reason = bearer_token_error(metadata, self._auth_token)
            if reason is not None:
                refusal = Unauthenticated(reason)
        return _wrap_handler(handler, method, refusal)


def _abort(context: grpc.ServicerContext, method: str, error: ControlError) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        logger.warning("refused %s from %s: %s", method, context.peer(), error)
    else:
        logger.info("%s from %s failed with %s: %s", method, context.peer(), code.name, error)
    context.abort(code, str(error))


def _wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, refusal: Unauthenticated | None
) -> grpc.RpcMethodHandler:
    def unary_response(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if refusal is not None:
                    raise refusal
                return behavior(request, context)
            except ControlError as e:
                _abort(context, method, e)

        return wrapped

    def stream_response(
        behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    ) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                if refusal is not None:
                    raise refusal
                yield from behavior(request, context)
            except ControlError as e:
                _abort(context, method, e)

        return wrapped

    serdes = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **serdes)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **serdes)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **serdes)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream_response(handler.stream_stream), **serdes
        )
    raise TypeError(f"handler for {method} has no behaviour")


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # Control streams are silent between events; without this, pings stop after two.
        ("grpc.http2.max_pings_without_data", 0),
    ]

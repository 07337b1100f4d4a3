"""The control plane's gRPC layer: its domain errors, their status codes, and the learner's server.

Status codes (the one mapping, used by the server interceptor and read back by the client):

  UnknownGenerator -> NOT_FOUND         the generator id was never registered, was removed, or the
                                        session id is stale (a newer registration replaced it);
                                        the generator's answer is always the same: register again.
  InvalidArgument  -> INVALID_ARGUMENT  a malformed request or one that cannot fit this run (e.g. a
                                        vocabulary size that differs from the learner's model).
  Unauthenticated  -> UNAUTHENTICATED   a missing or wrong bearer token.
  Unavailable      -> UNAVAILABLE       the learner is shutting down (or, on the client, stayed
                                        unreachable through every retry).

Draining on SIGTERM: ``server.stop(grace_s).wait()`` reports NOT_SERVING on grpc.health.v1, stops
taking calls and gives running ones ``grace_s`` to finish. Control streams only finish when the
registry ends them, so close it first when the run is over (generators receive Shutdown and exit);
when the learner is merely restarting, skip that and let the grace expire: generators see a broken
stream and re-register with the next learner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lpreg_core.config import ControlConfig
from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc
from services.common.auth import bearer_token_error

logger = logging.getLogger(__name__)

CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["LearnerControl"].full_name
# Kubernetes probes carry no token, so the health service is the one thing open to anyone.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

# Each Control stream pins one worker thread for its whole life (synchronous server), so the pool
# must exceed the generators one learner can have; threads start lazily, so the cap costs nothing.
MAX_CONTROL_STREAMS = 512
# Headroom for unary calls (register, heartbeat, acks, status) and health probes beside the streams.
UNARY_WORKERS = 32

# Pings find peers that vanished without closing the connection (a lost node), so their streams
# end instead of holding a worker; clients ping at KEEPALIVE_TIME_MS, which this minimum admits.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000


class ControlError(Exception):
    """A control-plane request the learner refuses; subclasses pick the gRPC status code."""


class UnknownGenerator(ControlError):
    """The generator id is not registered, or the session id is not its current session."""


class InvalidArgument(ControlError):
    """The request is malformed or does not fit this run."""


class Unauthenticated(ControlError):
    """The call carries no bearer token or a wrong one."""


class Unavailable(ControlError):
    """The learner is shutting down, or could not be reached."""


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


class ControlServer(grpc.Server):
    """A started gRPC server with its health service; ``stop`` reports NOT_SERVING first and
    releases the worker pool once every call has finished."""

    def __init__(
        self, server: grpc.Server, health_servicer: health.HealthServicer, pool: ThreadPoolExecutor
    ) -> None:
        self._server = server
        self._pool = pool
        self.health = health_servicer

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        self.health.enter_graceful_shutdown()
        done = self._server.stop(grace)
        threading.Thread(
            target=self._release_pool, args=(done,), name="lpreg-grpc-reaper", daemon=True
        ).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _release_pool(self, done: threading.Event) -> None:
        done.wait()
        self._pool.shutdown(wait=False)


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read the control-plane TLS {what} {path}: {e}") from e


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


def build_server(
    config: ControlConfig,
    servicer: control_pb2_grpc.LearnerControlServicer,
    auth_token: str | None,
) -> tuple[ControlServer, int]:
    """Start the learner's control server on ``config.host:config.port``; returns it and the bound
    port (port 0 binds a free one).

    Serves LearnerControl and grpc.health.v1 (SERVING). When ``config.require_auth`` is true every
    call except health probes must carry ``auth_token``. TLS is on when ``config.tls_cert_file``
    and ``tls_key_file`` are set.
    """
    if config.require_auth and not auth_token:
        raise ValueError(
            "control.require_auth is true but no auth token was given "
            f"(set {config.auth_token_env}, see services.common.auth.load_auth_token)"
        )
    workers = MAX_CONTROL_STREAMS + UNARY_WORKERS
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lpreg-grpc")
    server = grpc.server(
        pool,
        interceptors=[ControlInterceptor(auth_token if config.require_auth else None)],
        options=server_options(config.max_message_bytes),
        # Beyond this, calls fail fast with RESOURCE_EXHAUSTED instead of queueing behind streams.
        maximum_concurrent_rpcs=workers,
    )
    control_pb2_grpc.add_LearnerControlServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    address = _bind_address(config.host, config.port)
    try:
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [
                    (
                        _read_pem(config.tls_key_file, "key"),
                        _read_pem(config.tls_cert_file, "certificate"),
                    )
                ]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        pool.shutdown(wait=False)
        raise OSError(f"cannot bind the control server to {address}: {e}") from e
    if port == 0:
        pool.shutdown(wait=False)
        raise OSError(f"cannot bind the control server to {address}")
    server.start()
    for service in ("", CONTROL_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "control server listening on %s (tls=%s, auth=%s)",
        _bind_address(config.host, port),
        config.tls_cert_file is not None,
        config.require_auth,
    )
    return ControlServer(server, health_servicer, pool), port

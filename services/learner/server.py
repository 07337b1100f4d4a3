"""The learner's gRPC control server: LearnerControl plus grpc.health.v1, authenticated, TLS
when configured.

Draining on SIGTERM: ``server.stop(grace_s).wait()`` reports NOT_SERVING on grpc.health.v1, stops
taking calls and gives running ones ``grace_s`` to finish. Control streams only finish when the
registry ends them, so close it first when the run is over (generators receive Shutdown and exit);
when the learner is merely restarting, skip that and let the grace expire: generators see a broken
stream and re-register with the next learner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lpreg_core.config import ControlConfig
from lpreg_core.wire.lpreg.v1 import control_pb2, control_pb2_grpc
from services.common.grpc_status import ControlInterceptor, server_options

logger = logging.getLogger(__name__)

CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["LearnerControl"].full_name

# Each Control stream pins one worker thread for its whole life (synchronous server), so the pool
# must exceed the generators one learner can have; threads start lazily, so the cap costs nothing.
MAX_CONTROL_STREAMS = 512
# Headroom for unary calls (register, heartbeat, acks, status) and health probes beside the streams.
UNARY_WORKERS = 32


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


def build_server(
    config: ControlConfig,
    servicer: control_pb2_grpc.LearnerControlServicer,
    auth_token: str | None,
) -> tuple[ControlServer, int]:
    """Start the learner's control server on ``config.host:config.port``; returns it and the bound
    port (port 0 binds a free one).

    Serves LearnerControl and grpc.health.v1 (SERVING). When ``config.require_auth`` is true every
    call except health probes must carry ``auth_token`` (checked on metadata, before any body is
    read); each peer address holds at most ``config.max_calls_per_peer`` calls. TLS is on when
    ``config.tls_cert_file`` and ``tls_key_file`` are set.
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
        interceptors=[
            ControlInterceptor(
                auth_token if config.require_auth else None, config.max_calls_per_peer
            )
        ],
        options=server_options(config.max_message_bytes, config.max_calls_per_peer),
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

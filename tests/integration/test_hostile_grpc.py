"""gRPC resource exhaustion on the learner's control server (real server on loopback): calls
without a token are refused from their metadata, before any body is read, so half-open calls hold
no worker; one peer's concurrent calls are capped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_control_plane import (  # noqa: F401  (fixtures)
    TOKEN,
    WAIT_S,
    Learner,
    make_client,
    start_learner,
)

from lpreg_core.wire.lpreg.v1 import control_pb2
from services.common.auth import bearer_metadata
from services.generator.control_client import ControlClient

NUM_HALF_OPEN = 600
REGISTER = "/lpreg.v1.LearnerControl/Register"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class HalfOpenCalls:
    """Calls whose headers are sent but whose body never is: each request iterator blocks until
    ``close``. Each instance has a connection of its own, each call a stream on it."""

    def __init__(self, address: str, method: str, metadata: Any = None) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._release = threading.Event()
        self._method = self.channel.stream_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        self._metadata = metadata
        self.futures: list[grpc.Future] = []

    def _never(self) -> Iterator[bytes]:
        self._release.wait()
        yield from ()

    def open(self, n: int) -> None:
        for _ in range(n):
            self.futures.append(self._method.future(self._never(), metadata=self._metadata))

    def codes(self, timeout_s: float) -> list[grpc.StatusCode | None]:
        """Status of each call that ended within ``timeout_s`` (None: still open)."""
        done = threading.Event()
        remaining = [len(self.futures)]
        lock = threading.Lock()

        def one_done(_f: grpc.Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        for f in self.futures:
            f.add_done_callback(one_done)
        done.wait(timeout_s)
        return [f.code() if f.done() else None for f in self.futures]  # type: ignore[attr-defined]

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self._release.set()
        self.channel.close()


@pytest.fixture
def half_open() -> Iterator[Callable[..., HalfOpenCalls]]:
    opened: list[HalfOpenCalls] = []

    def make(address: str, method: str = REGISTER, metadata: Any = None) -> HalfOpenCalls:
        calls = HalfOpenCalls(address, method, metadata)
        opened.append(calls)
        return calls

    yield make
    for calls in opened:
        calls.close()


def legit_generator_works(client: ControlClient) -> None:
    """Register, heartbeat and receive a control event, as a generator does."""
    session = client.register().session_id
    assert session
    stub_beats = 0
    for _ in range(3):
        client._stub.Heartbeat(  # the public loop runs on a timer; three direct beats suffice
            control_pb2.HeartbeatRequest(generator_id=client.generator_id, session_id=session),
            timeout=WAIT_S,
            metadata=bearer_metadata(TOKEN),
        )
        stub_beats += 1
    assert stub_beats == 3


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_half_open_calls_without_a_token_do_not_shut_out_a_generator(
    start_learner: Callable[..., Learner],  # noqa: F811
    make_client: Callable[..., ControlClient],  # noqa: F811
    half_open: Callable[..., HalfOpenCalls],
) -> None:
    learner = start_learner()
    attack = half_open(learner.address)
    attack.open(NUM_HALF_OPEN)
    # Every one ends although its body never arrives: refused for the token from its metadata,
    # or (when the client opened streams faster than the connection's stream limit reached it)
    # refused by HTTP/2 itself, which gRPC reports as UNAVAILABLE. None holds a worker.
    codes = attack.codes(WAIT_S * 3)
    counts = {str(c): codes.count(c) for c in set(codes)}
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}, counts
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= NUM_HALF_OPEN // 2, counts
    # With the attackers' calls still open on their side, a generator registers and heartbeats.
    attack.open(NUM_HALF_OPEN)
    legit_generator_works(make_client(learner.address))
    assert [g.generator_id for g in learner.registry.snapshot()] == ["gen-0"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_peers_concurrent_calls_are_capped_and_released(
    start_learner: Callable[..., Learner],  # noqa: F811
    make_client: Callable[..., ControlClient],  # noqa: F811
    half_open: Callable[..., HalfOpenCalls],
) -> None:
    """A peer holding the token cannot pin more than max_calls_per_peer workers either (half-open
    calls wait for their body inside the cap); its slots come back when its calls end."""
    cap = 8
    learner = start_learner(max_calls_per_peer=cap)
    hog = half_open(learner.address, metadata=bearer_metadata(TOKEN))
    hog.open(cap)
    assert hog.codes(WAIT_S / 4).count(None) == cap  # open, waiting for a body
    # A second connection from the same address buys no more: the cap is per peer address.
    more = half_open(learner.address, metadata=bearer_metadata(TOKEN))
    more.open(5)
    codes = more.codes(WAIT_S)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5, codes
    assert hog.codes(0).count(None) == cap
    # Health probes share the peer's cap (they come from the same address here).
    channel = grpc.insecure_channel(learner.address)
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    hog.close()
    more.close()
    # The slots are released when the calls end; a generator on the same address now gets in.
    client = make_client(learner.address, retry_attempts=20)
    legit_generator_works(client)
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=WAIT_S
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_refused_calls_never_reach_the_servicer(
    start_learner: Callable[..., Learner],  # noqa: F811
) -> None:
    learner = start_learner()
    channel = grpc.insecure_channel(learner.address)
    register = channel.unary_unary(REGISTER, request_serializer=lambda b: b)
    # A body that is not even a RegisterRequest: refused for the token, never parsed.
    with pytest.raises(grpc.RpcError) as info:
        register(b"\xff" * 1000, timeout=WAIT_S)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert learner.registry.snapshot() == []
    channel.close()

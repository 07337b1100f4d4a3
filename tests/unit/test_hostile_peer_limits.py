"""The per-peer call cap and what a client retries (services.common.grpc_status,
services.generator.control_client); the real server is exercised in
tests/integration/test_hostile_grpc.py."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_status import (
    PEER_LIMIT_DETAILS,
    SERVER_LIMIT_DETAILS,
    PeerLimiter,
    peer_address,
)
from services.generator.control_client import is_retryable


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:40000", "ipv6:[::1]"),
        ("ipv6:[fe80::1%eth0]:1", "ipv6:[fe80::1%eth0]"),
        ("unix:/run/lpreg.sock", "unix:/run/lpreg.sock"),
    ],
)
def test_the_cap_is_per_address_not_per_connection(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_limiter_caps_each_peer_and_frees_slots() -> None:
    limiter = PeerLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    assert limiter.acquire("b")  # another peer is not affected
    limiter.release("a")
    assert limiter.in_use("a") == 1
    assert limiter.acquire("a")
    for _ in range(2):
        limiter.release("a")
    assert limiter.in_use("a") == 0
    with pytest.raises(ValueError):
        PeerLimiter(0)


class FakeError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "retry"),
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{PEER_LIMIT_DETAILS} (64 from ipv4:1.2.3.4)", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{SERVER_LIMIT_DETAILS}!", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", False),
        (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token", False),
    ],
)
def test_client_retries_concurrency_refusals_not_oversized_messages(
    code: grpc.StatusCode, details: str, retry: bool
) -> None:
    assert is_retryable(FakeError(code, details)) is retry

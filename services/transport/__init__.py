"""Adapters of ``lpreg_core.transport``: Redis Streams (real) and an in-memory one (unit tests)."""

from services.transport.memory import InMemoryState, InMemoryStreams
from services.transport.redis_conn import TransportAuthError, TransportUnavailable
from services.transport.redis_streams import RedisStreams

__all__ = [
    "InMemoryState",
    "InMemoryStreams",
    "RedisStreams",
    "TransportAuthError",
    "TransportUnavailable",
]

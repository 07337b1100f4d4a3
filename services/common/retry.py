"""Bounded retries with exponential backoff, for calls to services that may restart (Redis, gRPC)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def backoff_delays(
    attempts: int, *, base_s: float, max_s: float, jitter: bool = False
) -> Iterator[float]:
    """The ``attempts - 1`` waits between ``attempts`` tries: base_s, 2 base_s, 4 base_s, ... capped
    at max_s. With ``jitter`` each wait is drawn uniformly from [d/2, d], so that many clients
    that lost the same server do not reconnect in lockstep."""
    delay = base_s
    for _ in range(attempts - 1):
        capped = min(delay, max_s)
        yield random.uniform(capped / 2, capped) if jitter else capped
        delay *= 2


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int,
    base_s: float,
    max_s: float,
    retry_on: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError),
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    jitter: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping with exponential backoff after each failure
    that is an instance of ``retry_on``; other exceptions propagate at once.

    ``on_retry(attempt, error, delay_s)`` is called before each wait (attempt counts from 1). After
    the last attempt the last error is re-raised unchanged, so the caller can wrap it with context.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    delays = backoff_delays(attempts, base_s=base_s, max_s=max_s, jitter=jitter)
    attempt = 1
    while True:
        try:
            return fn()
        except retry_on as e:
            delay = next(delays, None)
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(attempt, e, delay)
            sleep(delay)
            attempt += 1

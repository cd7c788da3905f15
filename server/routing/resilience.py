"""Failure policy without I/O: a circuit breaker per endpoint and jittered exponential backoff.

Both take their clock and randomness from the caller, so tests drive them deterministically.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from enum import StrEnum


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): uniform in [0, min(max_s, base_s * 2**attempt)].

    "Full jitter" spreads the retries of many clients that failed together.
    """
    ceiling = min(max_s, base_s * 2.0 ** min(attempt, 62))
    return (rng or random).uniform(0.0, ceiling)


class BreakerState(StrEnum):
    closed = "closed"  # requests flow
    open = "open"  # requests are refused until the cool-down has passed
    half_open = "half_open"  # one trial request may go; its outcome closes or reopens the breaker


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``cooldown_s`` lets one trial through.

    The caller asks ``available()`` before choosing the endpoint, calls ``acquire()`` when it sends a
    request there, and ends every acquired request with exactly one of ``record_success()``,
    ``record_failure()`` or ``release()`` (an outcome that says nothing about the endpoint).
    """

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.openings = 0  # times the breaker went from closed to open

    def state(self) -> BreakerState:
        """The state now: an open breaker turns half-open by itself once the cool-down has passed."""
        if self._opened_at is None:
            return BreakerState.closed
        if self._clock() - self._opened_at < self.cooldown_s:
            return BreakerState.open
        return BreakerState.half_open

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def available(self) -> bool:
        """Whether a request may be sent now."""
        state = self.state()
        return state is BreakerState.closed or (state is BreakerState.half_open and not self._trial_in_flight)

    def acquire(self) -> None:
        """A request is being sent; in the half-open state it is the one trial."""
        if self.state() is BreakerState.half_open:
            self._trial_in_flight = True

    def record_success(self) -> None:
        """The endpoint answered: close the breaker."""
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        """The endpoint failed: count it, and open (or reopen after a failed trial) at the threshold."""
        self._failures += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            if self._opened_at is None:
                self.openings += 1
            self._opened_at = self._clock()

    def release(self) -> None:
        """The request ended without telling anything about the endpoint (e.g. it was cancelled)."""
        self._trial_in_flight = False

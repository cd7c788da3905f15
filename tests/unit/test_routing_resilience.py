"""Circuit breaker and backoff policy, on a fake clock."""

from __future__ import annotations

import random

import pytest

from tests.clock import FakeClock
from tritonrag.server.routing.resilience import BreakerState, CircuitBreaker, backoff_delay


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state() is BreakerState.closed and breaker.available()
    breaker.record_failure()
    assert breaker.state() is BreakerState.open
    assert not breaker.available()


def test_half_open_lets_one_trial_through_and_its_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 4.9
    assert breaker.state() is BreakerState.open
    clock.now += 0.2
    assert breaker.state() is BreakerState.half_open
    assert breaker.available()
    breaker.acquire()
    assert not breaker.available()  # the trial is in flight
    breaker.record_success()
    assert breaker.state() is BreakerState.closed
    assert breaker.available() and breaker.consecutive_failures == 0


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5.0
    breaker.acquire()
    breaker.record_failure()
    assert breaker.state() is BreakerState.open
    clock.now += 4.0
    assert not breaker.available()
    clock.now += 1.0
    assert breaker.available()


def test_released_trial_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    breaker.acquire()
    assert not breaker.available()
    breaker.release()
    assert breaker.available()
    assert breaker.state() is BreakerState.half_open


def test_acquire_in_closed_state_changes_nothing() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=FakeClock())
    breaker.acquire()
    breaker.acquire()
    assert breaker.available()


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CircuitBreaker(failure_threshold=0, cooldown_s=1.0)


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (50, 1.0), (10_000, 1.0)]:
        delays = [backoff_delay(attempt, 0.1, 1.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # spread over the whole range, not fixed
        assert len(set(delays)) > 100

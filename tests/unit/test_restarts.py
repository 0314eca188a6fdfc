"""Restart backoff of crashed pool processes: doubling up to a cap, forgiven after a stable run."""

from __future__ import annotations

from tierserve.ops.restarts import RestartBackoff


def test_immediate_crashes_back_off_exponentially_up_to_the_cap() -> None:
    backoff = RestartBackoff(initial_s=1.0, max_s=8.0, stable_after_s=60.0)
    now = 100.0
    delays = []
    for _ in range(6):
        backoff.started(now)
        restart_at = backoff.crashed(now + 0.5)
        delays.append(restart_at - (now + 0.5))
        assert not backoff.due(restart_at - 0.01) and backoff.due(restart_at)
        now = restart_at
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_process_that_stayed_up_restarts_quickly_again() -> None:
    backoff = RestartBackoff(initial_s=1.0, max_s=30.0, stable_after_s=60.0)
    backoff.started(0.0)
    backoff.crashed(1.0)
    backoff.started(2.0)
    assert backoff.crashed(3.0) == 5.0  # crashed again at once: 2 s
    backoff.started(5.0)
    assert backoff.crashed(500.0) == 501.0  # up for minutes: back to 1 s
    backoff.started(501.0)
    assert backoff.restart_at is None and not backoff.due(10_000.0)

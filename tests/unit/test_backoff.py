"""Restart backoff of the local cluster's supervisor."""

from __future__ import annotations

from dialogsctl.backoff import MAX_DELAY, STABLE_AFTER, after_exit


def test_crash_loop_doubles_the_wait_up_to_the_cap() -> None:
    """A process that keeps dying at once waits 1, 2, 4, 8, 16, then 30 s for ever."""
    failures, delays = 0, []
    for _ in range(8):
        failures, delay = after_exit(failures, uptime=0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]


def test_a_stable_run_resets_the_count() -> None:
    """Killed after staying up STABLE_AFTER seconds, a process comes back after 1 s, however often."""
    failures = 0
    for _ in range(6):
        failures, delay = after_exit(failures, uptime=STABLE_AFTER)
        assert (failures, delay) == (1, 1)


def test_the_issue_sequence() -> None:
    """The reported case (killed 3 s after it was healthy, five times) escalates; 13 s up resets."""
    failures, delays = 0, []
    for _ in range(5):
        failures, delay = after_exit(failures, uptime=3.0)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16]
    assert after_exit(failures, uptime=13.0) == (1, 1)

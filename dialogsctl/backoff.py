"""When the local cluster's supervisor restarts a process that exited: a pure decision.

Each crash doubles the wait before the next restart (1, 2, 4, … seconds, at most
``MAX_DELAY``), so a process that cannot start does not spin. A process that stayed up
for ``STABLE_AFTER`` seconds was working: its next crash counts as a first one again, so
a worker killed now and then comes back in a second every time instead of in 30.
"""

from __future__ import annotations

# Seconds a process (worker, proxy, PostgreSQL server) must stay up for its failure count
# to start again from zero. Longer than any start-up (a server's crash recovery, a
# worker's first health check), shorter than an operator's patience.
STABLE_AFTER = 10.0
# The longest wait between two restarts, seconds.
MAX_DELAY = 30.0


def after_exit(failures: int, uptime: float) -> tuple[int, float]:
    """A process exited after ``uptime`` seconds with ``failures`` crashes before it:
    the new failure count, and the seconds to wait before restarting it."""
    failures = 1 if uptime >= STABLE_AFTER else failures + 1
    return failures, min(2.0 ** (failures - 1), MAX_DELAY)

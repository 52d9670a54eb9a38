"""What a planned switchover checks on Patroni's view of a group before it asks for one."""

from __future__ import annotations

from typing import Any

from proxy.switchover import primary_of, problem


def _view(*members: tuple[str, str, str]) -> dict[str, Any]:
    return {"members": [{"name": n, "role": r, "state": s} for n, r, s in members]}


HEALTHY = _view(("s-0", "leader", "running"), ("s-1", "sync_standby", "streaming"))


def test_a_healthy_group_may_switch_over_to_its_standby() -> None:
    assert primary_of(HEALTHY) == "s-0"
    assert problem(HEALTHY, None) is None
    assert problem(HEALTHY, "s-1") is None


def test_no_primary_no_streaming_standby_or_a_wrong_candidate_is_refused() -> None:
    failing_over = _view(("s-0", "leader", "stopped"), ("s-1", "sync_standby", "streaming"))
    assert primary_of(failing_over) is None
    assert "no running primary" in (problem(failing_over, None) or "")
    alone = _view(("s-0", "leader", "running"), ("s-1", "replica", "starting"))
    assert "no streaming standby" in (problem(alone, None) or "")
    assert "s-0 is not a standby" in (problem(HEALTHY, "s-0") or "")
    assert "s-9 is not a standby" in (problem(HEALTHY, "s-9") or "")


def test_a_standby_of_patroni_before_3_1_is_running_not_streaming() -> None:
    """Patroni 3.0 (Debian bookworm's, in the compose stack's image) says "running" of a
    standby that replays; a stopped one is still refused."""
    older = _view(("s-0", "leader", "running"), ("s-1", "sync_standby", "running"))
    assert problem(older, None) is None and problem(older, "s-1") is None
    stopped = _view(("s-0", "leader", "running"), ("s-1", "sync_standby", "stopped"))
    assert "no streaming standby" in (problem(stopped, None) or "")

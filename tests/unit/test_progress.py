"""The migration progress bar: a total it can reach, counting before it is known."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from dialogsctl.progress import follow


class Replay:
    """The admin API's answers for one migration, one per poll (what the progress bar reads)."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states

    def migration(self, migration_id: int) -> dict[str, Any]:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def _state(phase: str, copied: int, total: int, **extra: Any) -> dict[str, Any]:
    return {
        "migration_id": 7,
        "kind": "add",
        "shard_id": "shard-3",
        "from_version": 1,
        "to_version": 2,
        "phase": phase,
        "rows_copied": copied,
        "rows_total": total,
        "rows_remaining": max(total - copied, 0),
        "ranges_copied": 0,
        "ranges_total": 4,
        "delta_copied": 0,
        **extra,
    }


def _shown(states: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    follow(Replay(states), 7, Console(file=out, width=200, force_terminal=False), poll=0)  # type: ignore[arg-type]
    return out.getvalue()


def test_rows_written_during_the_copy_never_overshoot_the_total() -> None:
    """Counted 1,060 at prepare, 1,061 copied (one was written meanwhile): the bar ends at 1,061/1,061."""
    shown = _shown([_state("prepare", 0, 0), _state("copy", 500, 1060), _state("done", 1061, 1060)])
    assert "rows 1,061/1,061" in shown, shown
    assert "1,061/1,060" not in shown


def test_an_aborted_migration_shows_how_far_it_got() -> None:
    shown = _shown([_state("copy", 300, 1000), _state("aborted", 300, 1000, error="aborted by the operator")])
    assert "rows 300/1,000" in shown and "aborted by the operator" in shown


def test_a_migration_with_nothing_to_copy_says_so() -> None:
    """Counted and found empty: 0, not "counting…" until the end."""
    shown = _shown([_state("prepare", 0, 0), _state("copy", 0, 0), _state("done", 0, 0)])
    assert "rows 0/0" in shown and "counting" not in shown, shown

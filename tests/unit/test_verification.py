"""The migration's geometry and its verification decisions, without any server."""

from __future__ import annotations

import datetime

import pytest

from dialogs.migration_plan import Move, MovePlan, Span
from proxy.migration.verification import (
    MAX_VERIFY_ROUNDS,
    SETTLED_RANGES,
    CutoverBudget,
    Verified,
    rounds_done,
    without,
)

# shard-1 gives [0, 9] and [20, 29] to shard-3; shard-2 gives [40, 49] to shard-3.
PLAN = MovePlan(
    [Move(0, 9, "shard-1", "shard-3"), Move(20, 29, "shard-1", "shard-3"), Move(40, 49, "shard-2", "shard-3")]
)
A, B = ("shard-1", "shard-3"), ("shard-2", "shard-3")


def test_the_plan_answers_who_gives_what_to_whom() -> None:
    """Sources, targets, leaving and arriving spans, and the move a key falls in."""
    assert PLAN.sources == ["shard-1", "shard-2"] and PLAN.targets == ["shard-3"]
    assert PLAN.leaving("shard-1") == [Span(0, 9), Span(20, 29)]
    assert PLAN.arriving("shard-3") == [Span(0, 9), Span(20, 29), Span(40, 49)]
    assert PLAN.pairs() == {A: [Span(0, 9), Span(20, 29)], B: [Span(40, 49)]}
    assert PLAN.move_of("shard-1", 25).lo == 20 and PLAN.move_of("shard-1", 9).lo == 0
    with pytest.raises(KeyError):
        PLAN.move_of("shard-1", 15)  # between two of its moves: it stays
    with pytest.raises(KeyError):
        PLAN.move_of("shard-2", 5)  # shard-1's, not shard-2's


def test_keys_are_grouped_by_pair_without_the_skipped_moves() -> None:
    assert PLAN.by_pair({"shard-1": [3, 25], "shard-2": [41]}) == {A: [3, 25], B: [41]}
    assert PLAN.by_pair({"shard-1": [3, 25], "shard-2": [41]}, skip_moves={20}) == {A: [3], B: [41]}


def test_rounds_stop_when_few_ranges_are_left_or_after_the_last() -> None:
    assert rounds_done(0, set(range(SETTLED_RANGES)))
    assert not rounds_done(0, set(range(SETTLED_RANGES + 1)))
    assert rounds_done(MAX_VERIFY_ROUNDS - 1, set(range(1000)))


def test_with_nothing_verified_the_cutover_checks_every_range_whole() -> None:
    """A resumed run (no head): every span of every pair, no single dialogs."""
    checks = Verified().cutover_checks(PLAN, {})
    assert checks.spans == PLAN.pairs() and checks.keys == {A: [], B: []}
    assert checks.counts == (3, 0)


def test_after_verification_the_cutover_checks_suspects_and_what_was_written() -> None:
    """Whole: only the suspect ranges. One by one: dialogs written past the head and the
    dialogs that differed while settling, except those inside a suspect range (its whole
    digest covers them)."""
    verified = Verified().after_round({"shard-1": (5, 0), "shard-2": (7, 0)}, {20})
    verified = verified.settled({"shard-1": (9, 0), "shard-2": (9, 0)}, {"shard-1": {4, 22}, "shard-2": set()})
    assert verified.head == {"shard-1": (9, 0), "shard-2": (9, 0)}
    checks = verified.cutover_checks(PLAN, {"shard-1": [7, 21], "shard-2": [44]})
    assert checks.spans == {A: [Span(20, 29)], B: []}
    assert checks.keys == {A: [4, 7], B: [44]}
    assert checks.counts == (1, 3)


def test_settling_rounds_add_to_the_suspect_dialogs() -> None:
    verified = Verified().after_round({"shard-1": (1, 0)}, set())
    verified = verified.settled({"shard-1": (2, 0)}, {"shard-1": {3}})
    verified = verified.settled({"shard-1": (3, 0)}, {"shard-1": {5}})
    assert verified.suspect_dialogs == {"shard-1": frozenset({3, 5})}
    assert verified.after_round({"shard-1": (4, 0)}, set()).suspect_dialogs == verified.suspect_dialogs


def test_a_range_excused_of_its_written_dialogs_matches_when_the_rest_does() -> None:
    """Digests are sums: the range minus the dialogs written past the head compares the rest."""
    source = {("range", 0): (10, 1000), ("dialog", 3): (4, 400)}
    target = {("range", 0): (7, 700), ("dialog", 3): (1, 100)}  # dialog 3 lags; the rest is equal
    assert without(source, Span(0, 9), [3]) == without(target, Span(0, 9), [3]) == (6, 600)
    assert without(source, Span(0, 9), []) != without(target, Span(0, 9), [])


def test_the_flip_must_commit_a_margin_before_the_earliest_lease_ends() -> None:
    """A fifth of the lease, at most a second, for clocks and the commit."""
    ends = {
        "shard-1": datetime.datetime(2026, 1, 1, 0, 0, 5, tzinfo=datetime.UTC),
        "shard-2": datetime.datetime(2026, 1, 1, 0, 0, 4, tzinfo=datetime.UTC),
    }
    budget = CutoverBudget(5.0)
    assert budget.margin == 1.0 and budget.until_flip == 4.0
    assert budget.flip_by(ends) == datetime.datetime(2026, 1, 1, 0, 0, 3, tzinfo=datetime.UTC)
    assert budget.left(1.5) == 2.5 and budget.left(9.0) == 0.0
    assert CutoverBudget(1.0).margin == 0.2

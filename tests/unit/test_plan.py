"""Migration planning: only ranges that change owner move, and the splits add up."""

from __future__ import annotations

import random

import pytest

from dialogs.keys import INT64_MAX, INT64_MIN
from dialogs.migration_plan import moved_fraction, moves, owned_after_split
from dialogs.shard_map import ShardMap

TWO = ShardMap(1, {"shard-1": 1, "shard-2": 1})


def _keys(count: int = 20000) -> list[int]:
    rng = random.Random(3)
    return [rng.randint(INT64_MIN, INT64_MAX) for _ in range(count)]


def _check_plan(old: ShardMap, new: ShardMap) -> list:  # type: ignore[type-arg]
    plan = moves(old.ring, new.ring)
    for before, after in zip(plan, plan[1:], strict=False):
        assert before.hi < after.lo
    for key in _keys():
        move = next((m for m in plan if m.lo <= key <= m.hi), None)
        if old.owner(key) == new.owner(key):
            assert move is None
        else:
            assert move is not None and (move.source, move.target) == (old.owner(key), new.owner(key))
    return plan


def test_adding_a_shard_moves_only_into_it() -> None:
    """Every move targets the new shard; about a third of the key space moves from two to three."""
    new = TWO.with_shard("shard-3")
    plan = _check_plan(TWO, new)
    assert {m.target for m in plan} == {"shard-3"}
    assert moved_fraction(plan) == pytest.approx(1 / 3, rel=0.1)


def test_removing_a_shard_moves_only_its_ranges() -> None:
    """Every move leaves the removed shard, and together they are all it owned."""
    three = TWO.with_shard("shard-3")
    new = three.without_shard("shard-1")
    plan = _check_plan(three, new)
    assert {m.source for m in plan} == {"shard-1"}
    assert moved_fraction(plan) == pytest.approx(three.ring.shares()["shard-1"])


def test_reweighting_moves_toward_the_heavier_shard() -> None:
    """Raising one shard's weight moves ranges to it only."""
    new = TWO.with_weight("shard-1", 2)
    plan = _check_plan(TWO, new)
    assert {(m.source, m.target) for m in plan} == {("shard-2", "shard-1")}


def test_same_map_moves_nothing() -> None:
    """A version bump with the same shards and weights plans no moves."""
    assert moves(TWO.ring, TWO.next(TWO.weights).ring) == []


def test_split_keeps_the_rest_of_the_source() -> None:
    """What a source keeps plus what leaves it is exactly what it owned, with no overlap."""
    new = TWO.with_shard("shard-3")
    plan = moves(TWO.ring, new.ring)
    for shard_id in ("shard-1", "shard-2"):
        kept = owned_after_split(TWO.ring, shard_id, plan)
        leaving = [m.span for m in plan if m.source == shard_id]
        pieces = sorted([(s.lo, s.hi) for s in kept] + [(s.lo, s.hi) for s in leaving])
        for (_, hi), (lo, _) in zip(pieces, pieces[1:], strict=False):
            assert hi < lo
        owned = sum(r.size for r in TWO.ring.ranges() if r.shard_id == shard_id)
        assert sum(hi - lo + 1 for lo, hi in pieces) == owned
        for key in _keys(3000):
            in_kept = any(s.lo <= key <= s.hi for s in kept)
            assert in_kept == (TWO.owner(key) == shard_id and new.owner(key) == shard_id)

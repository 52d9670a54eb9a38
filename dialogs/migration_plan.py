"""Migration planning, pure: which hash ranges change owner between two shard maps.

Both rings cover the whole key space with sorted ranges, so one merge walk finds every
stretch whose owner differs. Adding a shard yields only moves into it; removing one, only
moves out of it; a weight change, moves to or from the reweighted shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from dialogs.ring import HashRange, Ring


@dataclass(frozen=True, slots=True)
class Span:
    """A closed range of dialog keys, [lo, hi]."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Move:
    lo: int
    hi: int
    source: str
    target: str

    @property
    def span(self) -> Span:
        return Span(self.lo, self.hi)


def moves(old: Ring, new: Ring) -> list[Move]:
    """The key ranges whose owner differs between ``old`` and ``new``, sorted, adjacent ones merged."""
    result: list[Move] = []
    old_ranges, new_ranges = old.ranges(), new.ranges()
    i = j = 0
    start = old_ranges[0].lo
    while i < len(old_ranges) and j < len(new_ranges):
        a, b = old_ranges[i], new_ranges[j]
        end = min(a.hi, b.hi)
        if a.shard_id != b.shard_id:
            previous = result[-1] if result else None
            if previous and previous.hi + 1 == start and (previous.source, previous.target) == (a.shard_id, b.shard_id):
                result[-1] = Move(previous.lo, end, a.shard_id, b.shard_id)
            else:
                result.append(Move(start, end, a.shard_id, b.shard_id))
        start = end + 1
        if a.hi == end:
            i += 1
        if b.hi == end:
            j += 1
    return result


def owned_after_split(old: Ring, shard_id: str, outgoing: list[Move]) -> list[Span]:
    """The parts of ``shard_id``'s old ranges that stay with it, cut around the ranges leaving it."""
    leaving = sorted((m.lo, m.hi) for m in outgoing if m.source == shard_id)
    kept: list[Span] = []
    for hash_range in (r for r in old.ranges() if r.shard_id == shard_id):
        kept.extend(_subtract(hash_range, leaving))
    return kept


def _subtract(hash_range: HashRange, holes: list[tuple[int, int]]) -> list[Span]:
    pieces = []
    cursor = hash_range.lo
    for lo, hi in holes:
        if hi < cursor or lo > hash_range.hi:
            continue
        if lo > cursor:
            pieces.append(Span(cursor, lo - 1))
        cursor = max(cursor, hi + 1)
    if cursor <= hash_range.hi:
        pieces.append(Span(cursor, hash_range.hi))
    return pieces


def moved_fraction(plan: list[Move]) -> float:
    return sum(m.hi - m.lo + 1 for m in plan) / 2**64

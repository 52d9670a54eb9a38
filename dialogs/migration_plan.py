"""Migration planning, pure: which hash ranges change owner between two shard maps.

Both rings cover the whole key space with sorted ranges, so one merge walk finds every
stretch whose owner differs. Adding a shard yields only moves into it; removing one, only
moves out of it; a weight change, moves to or from the reweighted shard.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from dialogs.ring import HashRange, Ring
from dialogs.wire import Ownership


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


@dataclass(frozen=True, slots=True)
class Holdings:
    """What a database offered as a new shard already holds (read by ``shard_sql.holdings``).

    ``identity`` names where its tables live (server system identifier, database, schema):
    two DSNs that differ in text (a host alias, another port forward) but reach the same
    tables have the same identity.
    """

    identity: str
    range_states: dict[str, int]  # state -> ranges in it ('incoming' ones are a copy target's)
    messages: bool


def target_problem(target: Holdings, others: dict[str, str], resuming: bool = False) -> str | None:
    """Why ``target`` must not receive moving ranges, or None when it may.

    ``others`` maps every other shard of the cluster to its identity. A copy target's
    first steps delete rows in the moving ranges (to resume a crashed copy) and an abort
    deletes everything it copied: on a database that already serves ranges, that is
    acknowledged messages lost. So the target must be a database of its own, serving
    nothing and holding no messages. ``resuming``: a prepare that crashed may have marked
    ranges 'incoming' already; those alone are allowed.
    """
    same = same_database(target.identity, others)
    if same is not None:
        return same
    serving = {
        state: n for state, n in target.range_states.items() if n and not (resuming and state == Ownership.INCOMING)
    }
    if serving:
        states = ", ".join(f"{n} {state}" for state, n in sorted(serving.items()))
        return f"it already has shard ranges ({states}): it is, or was, another shard's database"
    if target.messages:
        return "it already holds messages: a new shard needs a database of its own, with no messages"
    return None


def same_database(identity: str, others: dict[str, str]) -> str | None:
    """Which shard of ``others`` (shard id -> identity) has its tables where ``identity`` says, in words."""
    for shard_id, other in sorted(others.items()):
        if other == identity:
            return f"it is the database of shard {shard_id} (the same server, database and schema)"
    return None


Pair = tuple[str, str]  # (source, target)


class MovePlan:
    """The geometry of one migration, pure: who gives what to whom.

    Built once from the migration's moves; every question the runner asks about them
    (which shards are sources or targets, which spans leave or arrive at a shard, which
    move a dialog key of a source falls in) is answered here without I/O.
    """

    def __init__(self, moves: list[Move]) -> None:
        self.moves = list(moves)
        self.sources = sorted({m.source for m in self.moves})
        self.targets = sorted({m.target for m in self.moves})
        self._by_source: dict[str, tuple[list[Move], list[int]]] = {}
        for source in self.sources:
            out = sorted((m for m in self.moves if m.source == source), key=lambda m: m.lo)
            self._by_source[source] = (out, [m.lo for m in out])

    def leaving(self, shard_id: str) -> list[Span]:
        return [m.span for m in self.moves if m.source == shard_id]

    def arriving(self, shard_id: str) -> list[Span]:
        return [m.span for m in self.moves if m.target == shard_id]

    def pairs(self) -> dict[Pair, list[Span]]:
        """The moving spans of each (source, target)."""
        pairs: dict[Pair, list[Span]] = {}
        for move in self.moves:
            pairs.setdefault((move.source, move.target), []).append(move.span)
        return pairs

    def move_of(self, source: str, key: int) -> Move:
        """The move out of ``source`` that holds dialog ``key`` (a bisect over its moves)."""
        moves, starts = self._by_source[source]
        index = bisect.bisect_right(starts, key) - 1
        if index < 0 or not moves[index].lo <= key <= moves[index].hi:
            raise KeyError(f"dialog key {key} does not leave {source} in this migration")
        return moves[index]

    def by_pair(
        self, keys_by_source: dict[str, list[int]], skip_moves: set[int] | frozenset[int] = frozenset()
    ) -> dict[Pair, list[int]]:
        """Dialog keys of each source grouped by (source, target), leaving out those in the
        moves whose ``lo`` is in ``skip_moves``."""
        grouped: dict[Pair, list[int]] = {}
        for source, keys in keys_by_source.items():
            for key in keys:
                move = self.move_of(source, key)
                if move.lo not in skip_moves:
                    grouped.setdefault((source, move.target), []).append(key)
        return grouped

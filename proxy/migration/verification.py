"""What the runner has verified so far, and what the cutover must still check: pure values.

Messages are append-only and every write to a migrating range is logged in its source's
delta log, so verification can be incremental (docs/resharding.md, invariant 5):

- A pre-verification round copies what is pending, digests ranges on both sides, and
  keeps as suspects the ranges that still differ once the dialogs written past its head
  are taken out. Every other range matched as of that head.
- A settling round moves the head up to the present by checking, one by one, the dialogs
  written since the verified head; those that differ are suspects for the cutover.
- The cutover checks whole only the suspect ranges, and one by one the dialogs written
  since the verified head and the suspect dialogs. With nothing verified (a resumed run),
  it checks every range whole.

The runner does the I/O (copying, digesting, reading delta keys) and asks these values what
to do next; the decisions are tested in ``tests/unit/test_verification.py``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from dialogs.metastore.migrations import Watermark
from dialogs.migration_plan import MovePlan, Pair, Span

# Digests keyed by ("range", lo) or ("dialog", dialog_key): (rows, sum of row hashes).
MixedDigests = dict[tuple[str, int], tuple[int, int]]

MAX_VERIFY_ROUNDS = 6  # pre-verification rounds before the cutover...
SETTLED_RANGES = 16  # ...stop once at most this many ranges are left for the cutover to re-check
DIALOG_ROUNDS = 2  # then rounds that verify, one by one, the dialogs written since the head


def rounds_done(round_index: int, left_to_check: set[int]) -> bool:
    """Whether pre-verification stops after round ``round_index`` (0-based), with
    ``left_to_check`` the moves (by ``lo``) the next round would digest whole."""
    return len(left_to_check) <= SETTLED_RANGES or round_index + 1 >= MAX_VERIFY_ROUNDS


@dataclass(frozen=True)
class CutoverChecks:
    """What the cutover digests on both sides: whole spans and single dialogs, per pair."""

    spans: dict[Pair, list[Span]]
    keys: dict[Pair, list[int]]

    @property
    def counts(self) -> tuple[int, int]:
        """(ranges digested whole, single dialogs), for the log."""
        return sum(len(s) for s in self.spans.values()), sum(len(k) for k in self.keys.values())


@dataclass(frozen=True)
class Verified:
    """What earlier rounds established. ``head`` None: nothing (every range is checked whole)."""

    head: dict[str, Watermark] | None = None
    suspect_ranges: frozenset[int] = frozenset()  # moves (by lo) that differed at the last round
    suspect_dialogs: dict[str, frozenset[int]] = field(default_factory=dict)  # per source

    def after_round(self, head: dict[str, Watermark], suspects: set[int]) -> Verified:
        """A pre-verification round matched every range but ``suspects`` as of ``head``."""
        return Verified(head, frozenset(suspects), self.suspect_dialogs)

    def settled(self, head: dict[str, Watermark], differing: dict[str, set[int]]) -> Verified:
        """A settling round checked every dialog written up to ``head``; ``differing`` (per
        source) did not match and stay for the cutover."""
        merged = dict(self.suspect_dialogs)
        for source, keys in differing.items():
            merged[source] = merged.get(source, frozenset()) | frozenset(keys)
        return Verified(head, self.suspect_ranges, merged)

    def cutover_checks(self, plan: MovePlan, written_since_head: dict[str, list[int]]) -> CutoverChecks:
        """What the cutover must digest, given the dialogs written past ``head`` (per source).

        A range that matched can differ only in dialogs logged after the head (every row
        logged before it was on both sides, and a copy of it arriving later changes
        nothing); dialogs in a suspect range are covered by that range's whole digest.
        """
        pairs = plan.pairs()
        if self.head is None:
            return CutoverChecks(pairs, {pair: [] for pair in pairs})
        keys: dict[Pair, set[int]] = {pair: set() for pair in pairs}
        for pair, written in plan.by_pair(written_since_head, self.suspect_ranges).items():
            keys[pair].update(written)
        suspects = {source: sorted(dialogs) for source, dialogs in self.suspect_dialogs.items()}
        for pair, dialogs in plan.by_pair(suspects, self.suspect_ranges).items():
            keys[pair].update(dialogs)
        return CutoverChecks(
            {pair: [s for s in spans if s.lo in self.suspect_ranges] for pair, spans in pairs.items()},
            {pair: sorted(k) for pair, k in keys.items()},
        )


def without(digests: MixedDigests, span: Span, keys: list[int]) -> tuple[int, int]:
    """The digest of ``span`` with the dialogs ``keys`` taken out (digests are sums): two
    sides that agree on this differ at most in those dialogs, which are checked one by one."""
    rows, checksum = digests.get(("range", span.lo), (0, 0))
    for key in keys:
        key_rows, key_checksum = digests.get(("dialog", key), (0, 0))
        rows, checksum = rows - key_rows, checksum - key_checksum
    return rows, checksum


# The flip must commit this long before the sources' leases end (at most a fifth of the
# lease): room for the clocks of the metadata and shard servers to differ, and for the commit.
MAX_CLOCK_MARGIN = 1.0


@dataclass(frozen=True)
class CutoverBudget:
    """The time a cutover has, from its lease (``DIALOGS_CUTOVER_DEADLINE``)."""

    lease: float

    @property
    def margin(self) -> float:
        return min(MAX_CLOCK_MARGIN, self.lease / 5)

    @property
    def until_flip(self) -> float:
        """Seconds from the freeze by which the flip must have committed, by this runner's clock."""
        return self.lease - self.margin

    def flip_by(self, lease_ends: dict[str, datetime.datetime]) -> datetime.datetime:
        """The moment, by the servers' clocks, after which the metadata server refuses the flip."""
        return min(lease_ends.values()) - datetime.timedelta(seconds=self.margin)

    def left(self, elapsed: float) -> float:
        """Seconds left for the flip after ``elapsed`` seconds of cutover (never negative)."""
        return max(0.0, self.until_flip - elapsed)

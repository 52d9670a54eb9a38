"""The copy phase's steps and pace, without a server."""

from __future__ import annotations

import pytest

from dialogs.metastore.migrations import Cursor, RangeCopy
from dialogs.migration_plan import Move
from proxy.migration.pacing import CopyBatch, copy_batches, pause_after


def _range(lo: int, rows: int, cursor: Cursor = None) -> RangeCopy:
    return RangeCopy(Move(lo, lo + 9, "shard-1", "shard-3"), rows, cursor, copied=False)


def _shape(batches: list[CopyBatch]) -> list[tuple[list[int], bool]]:
    return [([r.move.lo for r in b.ranges], b.in_steps) for b in batches]


def test_small_ranges_travel_together_until_a_batch_is_full() -> None:
    ranges = [_range(0, 40), _range(10, 40), _range(20, 30), _range(30, 5)]
    assert _shape(copy_batches(ranges, batch_size=100)) == [([0, 10, 20], False), ([30], False)]


def test_a_large_or_resumed_range_goes_alone_in_steps_and_keeps_the_order() -> None:
    """What was gathered before it goes first: each range is copied once, in the plan's order."""
    ranges = [_range(0, 10), _range(10, 500), _range(20, 10), _range(30, 1, cursor=(35, "lo", "hi", 7)), _range(40, 10)]
    assert _shape(copy_batches(ranges, batch_size=100)) == [
        ([0], False),
        ([10], True),
        ([20], False),
        ([30], True),
        ([40], False),
    ]


def test_nothing_pending_is_no_step() -> None:
    assert copy_batches([], batch_size=100) == []


@pytest.mark.parametrize(
    ("rows", "taken", "rate", "pause"),
    [
        (1000, 0.25, 1000, 0.75),  # a second's worth of rows in a quarter: wait the rest
        (1000, 2.0, 1000, 0.0),  # slower than the rate already: no wait
        (1000, 0.1, 0, 0.0),  # unthrottled
        (0, 0.1, 1000, 0.0),  # an empty batch
    ],
)
def test_the_copy_keeps_to_its_rate(rows: int, taken: float, rate: int, pause: float) -> None:
    assert pause_after(rows, taken, rate) == pytest.approx(pause)

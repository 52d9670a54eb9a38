"""The consistent-hash ring: pure, immutable, built from one shard-map version.

Each shard owns ``weight * vnodes_base`` virtual nodes. The token of virtual node ``i`` of
shard ``s`` is ``position(f"{s}#{i}")``. A key belongs to the first token at or after it,
wrapping past the largest token to the smallest. So the range owned by a token ``t`` is
``(previous token, t]``.

Because tokens depend only on the shard id and index, adding a shard only inserts tokens:
every key that moves, moves to the new shard, and no key moves between two old shards.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dialogs.keys import INT64_MAX, INT64_MIN, position

# 256 virtual nodes per unit of weight let the busiest of 16 equal shards hold 1.17x the
# mean; 1024 keeps every size from 2 to 16 under 1.07x (tests/unit/test_ring.py pins 1.10x).
VNODES_BASE = 1024


def token(shard_id: str, index: int) -> int:
    return position(f"{shard_id}#{index}".encode())


@dataclass(frozen=True, slots=True)
class HashRange:
    """The keys ``lo <= key <= hi`` (both inclusive, signed 64-bit) and their owner."""

    lo: int
    hi: int
    shard_id: str

    def __contains__(self, key: int) -> bool:
        return self.lo <= key <= self.hi

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1


class Ring:
    """Maps dialog keys to shard ids. Build once per shard-map version, then only read."""

    __slots__ = ("_tokens", "_owners", "weights", "vnodes_base")

    def __init__(self, weights: dict[str, int], vnodes_base: int = VNODES_BASE) -> None:
        if not weights:
            raise ValueError("a ring needs at least one shard")
        if any(weight < 1 for weight in weights.values()):
            raise ValueError("shard weights must be positive")
        # Each shard's points sorted on their own, then merged: the same order as one sort
        # of all of them, but no single call holds the GIL for the whole ring (one sort of
        # 65,536 points takes tens of milliseconds in C, and a map watcher that builds the
        # ring in a thread would stall its event loop for that long: docs/capacity.md).
        points = list(
            heapq.merge(
                *(
                    sorted((token(shard_id, index), shard_id) for index in range(weight * vnodes_base))
                    for shard_id, weight in weights.items()
                )
            )
        )
        self._tokens = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self.weights = dict(weights)
        self.vnodes_base = vnodes_base

    def lookup(self, key: int) -> str:
        """The shard that owns ``key``: a binary search over the sorted tokens."""
        index = bisect.bisect_left(self._tokens, key)
        if index == len(self._tokens):
            index = 0
        return self._owners[index]

    @property
    def shard_ids(self) -> frozenset[str]:
        return frozenset(self.weights)

    def ranges(self) -> list[HashRange]:
        """The whole key space as sorted, non-overlapping ranges, neighbours with one owner merged."""
        return list(_merge(self._raw_ranges()))

    def shares(self) -> dict[str, float]:
        """Each shard's fraction of the key space (exact, from range sizes)."""
        total = 2**64
        shares = dict.fromkeys(self.weights, 0.0)
        for hash_range in self.ranges():
            shares[hash_range.shard_id] += hash_range.size / total
        return shares

    def _raw_ranges(self) -> Iterator[HashRange]:
        # The wrapping range (last token, first token] is split at the ends of int64.
        first_owner = self._owners[0]
        yield HashRange(INT64_MIN, self._tokens[0], first_owner)
        for index in range(1, len(self._tokens)):
            lo = self._tokens[index - 1] + 1
            if lo <= self._tokens[index]:
                yield HashRange(lo, self._tokens[index], self._owners[index])
        if self._tokens[-1] < INT64_MAX:
            yield HashRange(self._tokens[-1] + 1, INT64_MAX, first_owner)


def _merge(ranges: Iterable[HashRange]) -> Iterator[HashRange]:
    current: HashRange | None = None
    for hash_range in ranges:
        if current is not None and current.shard_id == hash_range.shard_id:
            current = HashRange(current.lo, hash_range.hi, current.shard_id)
            continue
        if current is not None:
            yield current
        current = hash_range
    if current is not None:
        yield current

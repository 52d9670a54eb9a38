"""The consistent-hash ring: lookup, balance and movement, pinned without any server."""

from __future__ import annotations

import random
import uuid

import orjson
import pytest

from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key
from dialogs.ring import Ring, token
from dialogs.shard_map import ShardMap

THREE = {"shard-1": 1, "shard-2": 1, "shard-3": 1}


def _keys(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(INT64_MIN, INT64_MAX) for _ in range(count)]


def test_golden_keys_map_to_fixed_shards() -> None:
    """Known keys stay on known shards: hashing, token layout or lookup cannot change silently."""
    ring = Ring(THREE)
    pairs = {
        (uuid.UUID(int=1), uuid.UUID(int=2)): "shard-2",
        (
            uuid.UUID("e4d2e6b0-cde2-42c5-aac3-0b8316f21e58"),
            uuid.UUID("1d535fd6-7521-4cb1-aa6d-031be7123c4d"),
        ): "shard-1",
        (
            uuid.UUID("b107cb86-5493-43e6-9b98-ef306fe060ae"),
            uuid.UUID("5772121f-c936-4d1f-af59-e22c0eba0804"),
        ): "shard-1",
    }
    for (a, b), shard in pairs.items():
        assert ring.lookup(dialog_key(a, b)) == shard
    assert ring.lookup(INT64_MIN) == "shard-3"
    assert ring.lookup(0) == "shard-2"
    assert ring.lookup(INT64_MAX) == "shard-3"
    assert token("shard-1", 0) == -4710565074243239693


def test_lookup_agrees_with_ranges() -> None:
    """ranges() cover the whole key space without gaps, and each key's range names its owner."""
    ring = Ring(THREE)
    ranges = ring.ranges()
    assert ranges[0].lo == INT64_MIN and ranges[-1].hi == INT64_MAX
    for before, after in zip(ranges, ranges[1:], strict=False):
        assert after.lo == before.hi + 1
        assert after.shard_id != before.shard_id  # neighbours with one owner are merged
    for key in _keys(2000):
        owner = next(r.shard_id for r in ranges if key in r)
        assert ring.lookup(key) == owner


@pytest.mark.parametrize("count", range(2, 17))
def test_busiest_shard_holds_at_most_110_percent_of_the_mean(count: int) -> None:
    """With 2 to 16 equal shards, no shard owns more than 1.10x its fair share."""
    ring = Ring({f"shard-{i}": 1 for i in range(1, count + 1)})
    shares = ring.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert max(shares.values()) * count <= 1.10
    # Keys, not just key space: sample dialog keys and count.
    keys = [dialog_key(uuid.UUID(int=i), uuid.UUID(int=i + 1)) for i in range(0, 40000, 2)]
    counts: dict[str, int] = {}
    for key in keys:
        counts[ring.lookup(key)] = counts.get(ring.lookup(key), 0) + 1
    assert max(counts.values()) <= 1.10 * len(keys) / count * 1.05  # sampling noise allowance


@pytest.mark.parametrize("count", [2, 3, 5, 8, 15])
def test_adding_a_shard_moves_about_one_nth_and_only_to_it(count: int) -> None:
    """Adding a shard to N moves ~1/(N+1) of keys, all to the new shard, none between old ones."""
    old = Ring({f"shard-{i}": 1 for i in range(1, count + 1)})
    new = Ring({f"shard-{i}": 1 for i in range(1, count + 2)})
    keys = _keys(20000)
    moved = [k for k in keys if old.lookup(k) != new.lookup(k)]
    assert all(new.lookup(k) == f"shard-{count + 1}" for k in moved)
    assert len(moved) / len(keys) == pytest.approx(1 / (count + 1), rel=0.15)


def test_removing_a_shard_moves_only_its_keys() -> None:
    """Keys of the remaining shards stay where they are."""
    old = Ring(THREE)
    new = Ring({"shard-1": 1, "shard-3": 1})
    for key in _keys(5000):
        if old.lookup(key) != "shard-2":
            assert new.lookup(key) == old.lookup(key)


def test_weight_scales_share() -> None:
    """A shard of weight 2 holds about twice the keys of a shard of weight 1."""
    shares = Ring({"shard-1": 2, "shard-2": 1}).shares()
    assert shares["shard-1"] / shares["shard-2"] == pytest.approx(2.0, rel=0.1)


def test_ring_needs_shards_with_positive_weights() -> None:
    """An empty ring or a weight below 1 is refused."""
    with pytest.raises(ValueError):
        Ring({})
    with pytest.raises(ValueError):
        Ring({"shard-1": 0})


def test_a_64_shard_map_stays_balanced_and_its_65th_shard_takes_only_its_share() -> None:
    """The capacity model's deployment (docs/capacity.md): a synthetic map of 64 equal
    shards. No shard owns more than 1.10x the mean share of the key space; a 65th shard
    takes about 1/65 of the keys, every moved key goes to it, and the map a process loads
    (its JSON) stays a few kilobytes."""
    weights = {f"shard-{i}": 1 for i in range(1, 65)}
    ring = Ring(weights)
    shares = ring.shares()
    assert max(shares.values()) * 64 <= 1.10
    grown = Ring({**weights, "shard-65": 1})
    assert grown.shares()["shard-65"] == pytest.approx(1 / 65, rel=0.10)
    keys = _keys(20000)
    moved = [k for k in keys if ring.lookup(k) != grown.lookup(k)]
    assert moved and all(grown.lookup(k) == "shard-65" for k in moved)
    assert len(orjson.dumps(ShardMap(1, weights).to_json())) < 4096

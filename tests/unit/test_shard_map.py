"""Shard maps: versions, the changes an operator can make, and their validation."""

from __future__ import annotations

import pytest

from dialogs.shard_map import ShardMap

TWO = ShardMap(1, {"shard-1": 1, "shard-2": 1})


def test_each_change_is_the_next_version() -> None:
    """Adding, removing and reweighting produce version + 1 and leave the original alone."""
    added = TWO.with_shard("shard-3")
    assert added.map_version == 2 and added.shard_ids == ["shard-1", "shard-2", "shard-3"]
    assert TWO.without_shard("shard-1").weights == {"shard-2": 1}
    assert TWO.with_weight("shard-2", 3).weights == {"shard-1": 1, "shard-2": 3}
    assert TWO.weights == {"shard-1": 1, "shard-2": 1}


def test_invalid_changes_are_refused() -> None:
    """Duplicate or unknown shards, the last shard, bad names and weights: ValueError."""
    with pytest.raises(ValueError, match="already"):
        TWO.with_shard("shard-1")
    with pytest.raises(ValueError, match="not in the map"):
        TWO.without_shard("shard-9")
    with pytest.raises(ValueError, match="last shard"):
        ShardMap(1, {"shard-1": 1}).without_shard("shard-1")
    with pytest.raises(ValueError, match="shard_id"):
        TWO.with_shard("Bad Name")
    with pytest.raises(ValueError, match="weight"):
        TWO.with_weight("shard-1", 0)
    with pytest.raises(ValueError, match="weight"):
        TWO.with_weight("shard-1", 101)


def test_json_round_trip() -> None:
    """A map survives the trip through the metadata database's JSON."""
    assert ShardMap.from_json(TWO.to_json()) == TWO
    assert ShardMap.from_json(TWO.to_json()).owner(12345) == TWO.owner(12345)


def test_no_shard_may_take_the_metadata_databases_name() -> None:
    """`meta` names the metadata database in folders, Patroni groups and switchovers."""
    from dialogs.shard_map import validate_shard_id

    assert validate_shard_id("meta-1") == "meta-1"
    with pytest.raises(ValueError, match="metadata database's name"):
        validate_shard_id("meta")

"""Names the local cluster gives new shards."""

from __future__ import annotations

from dialogsctl.cluster import next_shard_id


def test_after_the_highest_generated_name() -> None:
    """An unnamed shard gets shard-N after the highest shard-N, gaps left alone."""
    assert next_shard_id([]) == "shard-1"
    assert next_shard_id(["shard-1", "shard-2"]) == "shard-3"
    assert next_shard_id(["shard-3", "shard-1"]) == "shard-4"


def test_operator_names_do_not_take_part() -> None:
    """Names like eu-db-2, shard-x or shard-2-old neither crash nor count."""
    assert next_shard_id(["eu-db-2", "shard-1"]) == "shard-2"
    assert next_shard_id(["eu-db-7", "shard-x", "shard-2-old", "eu-3"]) == "shard-1"
    assert next_shard_id(["shard-09"]) == "shard-10"

"""Shard maps: one immutable version of which shards exist and their weights.

A change to the topology never edits a map; it makes the next version. The metadata
database stores versions and only accepts a new one written on top of the latest
(compare-and-swap, see ``dialogs.metastore.maps.activate``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from dialogs.ring import VNODES_BASE, Ring

SHARD_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_WEIGHT = 100


# The metadata database's name wherever shards are named too (its folders, its Patroni
# group, `dialogs shard switchover meta`, the admin API's switchover): no shard may take it.
METADATA_NAME = "meta"


def validate_shard_id(shard_id: str) -> str:
    if not SHARD_ID_PATTERN.match(shard_id):
        raise ValueError(
            "shard_id must start with a lowercase letter and hold only lowercase letters,"
            " digits, '-' and '_' (at most 63 characters)"
        )
    if shard_id == METADATA_NAME:
        raise ValueError(f"shard_id {METADATA_NAME!r} is the metadata database's name")
    return shard_id


def validate_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}")
    return weight


@dataclass(frozen=True)
class ShardMap:
    map_version: int
    weights: dict[str, int]
    vnodes_base: int = VNODES_BASE

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("a shard map needs at least one shard")
        for shard_id, weight in self.weights.items():
            validate_shard_id(shard_id)
            validate_weight(weight)

    # A frozen dataclass still lets cached_property fill the instance __dict__ once.
    @functools.cached_property
    def ring(self) -> Ring:
        return Ring(self.weights, self.vnodes_base)

    def owner(self, dialog_key: int) -> str:
        return self.ring.lookup(dialog_key)

    @property
    def shard_ids(self) -> list[str]:
        return sorted(self.weights)

    def next(self, weights: dict[str, int]) -> ShardMap:
        """The version after this one, with ``weights``."""
        return ShardMap(self.map_version + 1, dict(sorted(weights.items())), self.vnodes_base)

    def with_shard(self, shard_id: str, weight: int = 1) -> ShardMap:
        if shard_id in self.weights:
            raise ValueError(f"shard {shard_id!r} is already in the map")
        return self.next({**self.weights, shard_id: weight})

    def without_shard(self, shard_id: str) -> ShardMap:
        if shard_id not in self.weights:
            raise ValueError(f"shard {shard_id!r} is not in the map")
        if len(self.weights) == 1:
            raise ValueError("cannot remove the last shard")
        return self.next({s: w for s, w in self.weights.items() if s != shard_id})

    def with_weight(self, shard_id: str, weight: int) -> ShardMap:
        if shard_id not in self.weights:
            raise ValueError(f"shard {shard_id!r} is not in the map")
        return self.next({**self.weights, shard_id: weight})

    def to_json(self) -> dict[str, Any]:
        return {
            "map_version": self.map_version,
            "vnodes_base": self.vnodes_base,
            "shards": [{"shard_id": s, "weight": w} for s, w in sorted(self.weights.items())],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardMap:
        return cls(
            map_version=int(data["map_version"]),
            weights={entry["shard_id"]: int(entry["weight"]) for entry in data["shards"]},
            vnodes_base=int(data.get("vnodes_base", VNODES_BASE)),
        )

"""`python -m bench.capacity`: the ring and the shard map at 2, 64 and 256 shards (issue 19's
capacity model, docs/capacity.md).

For each size, an in-process measurement of what every proxy and worker does with a map
version: build its ring (the best of three), look keys up (ns per lookup over 200,000
random keys), hold the ring (bytes allocated while building it, tracemalloc), and what
the map weighs (its JSON in the metadata database's ``shard_maps.shards`` and on the
wire). Then what the ring implies for the shards: the busiest shard's share of the key
space against the mean, the ranges a shard owns (rows of each shard's ``shard_ranges``,
looked up by every fenced write), and adding one more shard: the share of keys it takes
and the ranges that move. Last, how long a process's event loop stalls while a new map's
ring is built: on its first lookup, or in a thread as ``maps.newer_map`` does it.

No servers: these are the per-process costs the capacity model multiplies out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import tracemalloc
from typing import Any

import orjson

from dialogs.ring import Ring
from dialogs.shard_map import ShardMap


def _weights(count: int) -> dict[str, int]:
    return {f"shard-{number}": 1 for number in range(1, count + 1)}


def ring_at(count: int, lookups: int = 200_000) -> dict[str, Any]:
    weights = _weights(count)
    builds = []
    for _ in range(3):
        started = time.perf_counter()
        ring = Ring(weights)
        builds.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ring = Ring(weights)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    rng = random.Random(1)
    keys = [rng.randrange(-(2**63), 2**63) for _ in range(lookups)]
    lookup = ring.lookup
    started = time.perf_counter()
    for key in keys:
        lookup(key)
    per_lookup = (time.perf_counter() - started) / lookups
    shares = ring.shares()
    ranges = ring.ranges()
    grown = Ring(_weights(count + 1))
    new_shard = f"shard-{count + 1}"
    shard_map = ShardMap(1, weights)
    return {
        "shards": count,
        "tokens": count * ring.vnodes_base,
        "build_ms": round(min(builds) * 1000, 1),
        "lookup_ns": round(per_lookup * 1e9),
        "ring_bytes": held,
        "map_json_bytes": len(orjson.dumps(shard_map.to_json())),
        "busiest_share_vs_mean": round(max(shares.values()) * count, 3),
        "ranges_per_shard": round(len(ranges) / count),
        "adding_one_more": {
            "share_taken": round(grown.shares()[new_shard], 5),
            "mean_share_after": round(1 / (count + 1), 5),
            "ranges_moved": sum(1 for r in grown.ranges() if r.shard_id == new_shard),
        },
    }


async def _longest_stall(build_in_thread: bool, weights: dict[str, int]) -> float:
    """The longest gap of a 1 ms ticker on the event loop while a new map's ring is built:
    on its first lookup in the loop, or in a thread as ``maps.newer_map`` builds it."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    shard_map = ShardMap(1, weights)
    if build_in_thread:
        await asyncio.to_thread(lambda: shard_map.ring)
    else:
        shard_map.owner(0)
    await asyncio.sleep(0.05)
    stop.set()
    await ticker
    return max(gaps)


async def stalls(count: int) -> dict[str, Any]:
    weights = _weights(count)
    return {
        "shards": count,
        "first_lookup_in_the_loop_ms": round(await _longest_stall(False, weights) * 1000, 1),
        "built_in_a_thread_ms": round(await _longest_stall(True, weights) * 1000, 1),
    }


def figures(sizes: tuple[int, ...] = (2, 64, 256)) -> dict[str, Any]:
    return {
        "ring": [ring_at(count) for count in sizes],
        "event_loop_stall_while_a_new_map_builds": [asyncio.run(stalls(count)) for count in sizes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,64,256", help="comma-separated shard counts")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(","))
    print(json.dumps(figures(sizes), indent=2))


if __name__ == "__main__":
    main()

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

These need no servers: they are the per-process costs the capacity model multiplies out.

With servers (``--follow``, ``--metadata``; both start the bench cluster):

- **Following a map version**: the bench cluster with 2 proxies and 6 workers (3 per
  shard), each a process of its own; a synthetic map of 64 (then 256) shards is made
  active (the two real shards keep their share of it; nothing is routed meanwhile), and
  each process's ``/health`` is polled every 2 ms until it names the new version: the
  time from the commit to the last process. Then the real map comes back as the next
  version, timed the same way.
- **Metadata load**: each statement every process runs against the metadata database
  on its own (a worker's and a proxy's heartbeat, a worker's and a proxy's poll), run
  by pgbench at 32 clients against a metadata database holding a 64-shard deployment's
  rows (64 shards, 128 workers, 80 proxies): the most it serves per second, for the
  model to divide the deployment's rate by.
- **Hot dialog and hot user** (``--hot``): sends at 32 connections spread over the pairs
  of 64 users, against the same load into one dialog, and into one recipient from 63
  senders; loaded in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
import tracemalloc
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench import load
from bench.harness import SEND_BODY, BenchCluster, Client
from dialogs.metastore import maps
from dialogs.ring import Ring
from dialogs.shard_map import ShardMap
from dialogsctl.embedded import scratch_folder


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


async def _versions(session: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    versions = []
    for url in urls:
        async with session.get(url) as response:
            versions.append((await response.json())["map_version"])
    return versions


async def _followed(session: aiohttp.ClientSession, urls: list[str], version: int, committed: float) -> list[float]:
    """Seconds from ``committed`` until each of ``urls`` (health) names ``version``."""
    seen: dict[str, float] = {}
    deadline = committed + 30
    while len(seen) < len(urls) and time.monotonic() < deadline:
        pending = [url for url in urls if url not in seen]
        for url, current in zip(pending, await _versions(session, pending), strict=True):
            if current >= version:
                seen[url] = time.monotonic() - committed
        await asyncio.sleep(0.002)
    if len(seen) < len(urls):
        raise RuntimeError(f"{len(urls) - len(seen)} processes did not follow map version {version} in 30 s")
    return [seen[url] for url in urls]


async def follow(sizes: tuple[int, ...] = (64, 256), workers_per_shard: int = 3) -> list[dict[str, Any]]:
    """How long every proxy and worker takes to route by a new map version (see the module's doc)."""
    tmp = scratch_folder("dialogs-capacity-")
    cluster = BenchCluster(tmp, spares=0)
    try:
        await cluster.start(proxies=2)
        for shard_id in ("shard-1", "shard-2"):
            for _ in range(workers_per_shard - 1):
                cluster.start_worker(shard_id, name=f"{shard_id}-{len(cluster.workers)}")
        await asyncio.to_thread(cluster.wait_workers)
        urls = [child.health_url for child in [*cluster.proxies, *cluster.workers.values()]]
        results = []
        con = await asyncpg.connect(cluster.dsn("meta"))
        try:
            async with aiohttp.ClientSession() as session:
                for count in sizes:
                    real = await maps.active_map(con)
                    assert real is not None
                    synthetic = real.next({**_weights(count), **real.weights})
                    figures: dict[str, Any] = {"shards": count, "processes": len(urls)}
                    for name, new in (("to_synthetic_s", synthetic), ("back_s", synthetic.next(real.weights))):
                        await maps.activate(con, new, f"bench.capacity: follow {count}")
                        times = await _followed(session, urls, new.map_version, time.monotonic())
                        figures[name] = {"last": round(max(times), 3), "first": round(min(times), 3)}
                    results.append(figures)
        finally:
            await con.close()
        return results
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# Each process's statements against the metadata database (dialogs/metastore): a heartbeat
# every DIALOGS_HEARTBEAT_INTERVAL (1 s), a poll every DIALOGS_POLL_INTERVAL (2 s).
_METADATA_STATEMENTS = {
    "worker_heartbeat": """
\\set w random(1, 128)
INSERT INTO workers (worker_id, shard_id, url, map_version)
SELECT 'w' || :w, 'shard-' || (1 + :w % 64), 'http://10.0.0.1:8001', 1
WHERE EXISTS (SELECT 1 FROM shards WHERE shard_id = 'shard-' || (1 + :w % 64))
ON CONFLICT (worker_id) DO UPDATE SET url = EXCLUDED.url, map_version = EXCLUDED.map_version, heartbeat_at = now()
RETURNING worker_id;
""",
    "proxy_heartbeat": """
\\set p random(1, 80)
INSERT INTO proxies (proxy_id, url, map_version) VALUES ('p' || :p, 'http://10.0.0.2:8000', 1)
ON CONFLICT (proxy_id) DO UPDATE SET url = EXCLUDED.url, map_version = EXCLUDED.map_version, heartbeat_at = now();
""",
    "worker_poll": """
SELECT map_version, shards, vnodes_base FROM shard_maps ORDER BY map_version DESC LIMIT 1;
SELECT shard_id, dsn FROM shards;
""",
    "proxy_poll": """
SELECT map_version, shards, vnodes_base FROM shard_maps ORDER BY map_version DESC LIMIT 1;
SELECT worker_id, shard_id, url, map_version, extract(epoch FROM now() - heartbeat_at)::float8 AS age
FROM workers ORDER BY shard_id, worker_id;
""",
}


async def metadata_load(shards: int = 64, workers: int = 128, proxies: int = 80, seconds: float = 5) -> dict[str, Any]:
    """The most each metadata statement is served per second, on a 64-shard deployment's rows."""
    tmp = scratch_folder("dialogs-capacity-")
    cluster = BenchCluster(tmp, spares=0)
    try:
        await cluster.start(proxies=1)
        con = await asyncpg.connect(cluster.dsn("meta"))
        try:
            real = await maps.active_map(con)
            assert real is not None
            for number in range(3, shards + 1):
                await maps.register_shard(con, f"shard-{number}", f"postgresql://10.0.1.{number}/postgres")
            await maps.activate(con, real.next(_weights(shards)), "bench.capacity: metadata load")
            for number in range(1, workers + 1):
                shard_id = f"shard-{1 + number % shards}"
                await con.execute(
                    "INSERT INTO workers (worker_id, shard_id, url) VALUES ($1, $2, 'http://10.0.0.1:8001')",
                    f"w{number}",
                    shard_id,
                )
            for number in range(1, proxies + 1):
                await con.execute(
                    "INSERT INTO proxies (proxy_id, url) VALUES ($1, 'http://10.0.0.2:8000')", f"p{number}"
                )
        finally:
            await con.close()
        for child in [*cluster.proxies, *cluster.workers.values()]:
            child.stop()  # only the statements below load the server
        served = {
            name: round(load.pgbench(cluster.dsn("meta"), script, 32, seconds).per_second)
            for name, script in _METADATA_STATEMENTS.items()
        }
        return {"shards": shards, "workers": workers, "proxies": proxies, "per_second_at_32_clients": served}
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _sends(pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> list[dict[str, object]]:
    """Sends for (sender, recipient) pairs of (id, token)."""
    return [
        {
            "method": "POST",
            "path": f"/dialog/{recipient[0]}/send",
            "body": SEND_BODY,
            "headers": {"Authorization": f"Bearer {sender[1]}", "Content-Type": "application/json"},
        }
        for sender, recipient in pairs
    ]


async def hot(connections: int = 32, seconds: float = 6, rounds: int = 2) -> dict[str, Any]:
    """Sends at ``connections`` spread over the pairs of 64 users, against the same load
    into one dialog (one sender, one recipient), and into one recipient from 63 senders
    (her inbox row per sender and her badge take every change): loaded in turns."""
    tmp = scratch_folder("dialogs-capacity-")
    cluster = BenchCluster(tmp, spares=0)
    try:
        await cluster.start(proxies=1)
        async with aiohttp.ClientSession() as session:
            client = Client(session, cluster.proxy_urls)
            users = [await client.user(f"u{i}") for i in range(64)]
        rng = random.Random(11)
        loads = {
            "spread": _sends([(pair[0], pair[1]) for pair in (rng.sample(users, 2) for _ in range(2000))]),
            "one_dialog": _sends([(users[1], users[0])] * 100),
            "one_recipient": _sends([(users[1 + i % 63], users[0]) for i in range(2000)]),
        }
        url = cluster.proxy_urls[0]
        runs: dict[str, list[load.Load]] = {name: [] for name in loads}
        order = list(loads)
        load.wrk(url, loads["spread"], connections, 2)  # warm up (tokens, connections)
        for _ in range(rounds):
            for name in order:
                runs[name].append(load.wrk(url, loads[name], connections, seconds))
            order.reverse()
        mean = {name: sum(run.per_second for run in done) / len(done) for name, done in runs.items()}
        return {
            "connections": connections,
            **{name: [run.to_json() for run in done] for name, done in runs.items()},
            "one_dialog_vs_spread": round(mean["one_dialog"] / mean["spread"], 3),
            "one_recipient_vs_spread": round(mean["one_recipient"] / mean["spread"], 3),
        }
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,64,256", help="comma-separated shard counts")
    parser.add_argument("--follow", action="store_true", help="also time processes following a new map version")
    parser.add_argument("--metadata", action="store_true", help="also measure what the metadata database serves")
    parser.add_argument("--hot", action="store_true", help="also measure sends into one dialog and one recipient")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(","))
    results = figures(sizes)
    if args.follow:
        results["following_a_new_map_version"] = asyncio.run(follow(tuple(s for s in sizes if s > 2)))
    if args.metadata:
        results["metadata_statements"] = asyncio.run(metadata_load())
    if args.hot:
        results["hot_dialog_and_user"] = asyncio.run(hot())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""`python -m bench` (or `make bench`): the brief's figures, each against a baseline of the same run.

1. send throughput through the proxies vs raw single-row INSERTs into one shard, same concurrency
2. list latency the proxy and worker add over the same query run directly (p50)
3. resharding copy rate vs PostgreSQL's own COPY between the same two servers
4. the write pause at cutover, under load (client-side latency of sends in flight during it),
   once with headroom (8 senders) and once with the machine saturated (32 senders)

Results go to stdout and bench/results/latest.json. Servers run with fsync on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import BenchCluster, Client, preload, psql_copy, quantile
from dialogs.keys import dialog_key
from dialogsctl.embedded import scratch_folder

COLUMNS = "dialog_key, user_lo, user_hi, id, from_lo, text, created_at, idempotency_key"


async def raw_insert_rate(dsn: str, concurrency: int, seconds: float) -> float:
    """Single-row autocommit INSERTs into one shard (a scratch copy of the messages table)."""
    con = await asyncpg.connect(dsn)
    await con.execute("DROP TABLE IF EXISTS bench_raw; CREATE TABLE bench_raw (LIKE messages INCLUDING ALL)")
    await con.close()
    counter = itertools.count(1)
    done = 0
    async with asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency) as pool:
        deadline = time.monotonic() + seconds

        async def insert_forever() -> None:
            nonlocal done
            rng = random.Random()
            async with pool.acquire() as con:
                statement = await con.prepare(
                    "INSERT INTO bench_raw (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)"
                    " VALUES ($1, $2, $3, $4, true, $5, now())"
                )
                while time.monotonic() < deadline:
                    a, b = sorted((uuid.uuid4(), uuid.uuid4()))
                    await statement.fetch(rng.getrandbits(63), a, b, next(counter), "hello, this is a message")
                    done += 1

        started = time.monotonic()
        await asyncio.gather(*(insert_forever() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    con = await asyncpg.connect(dsn)
    await con.execute("DROP TABLE bench_raw")
    await con.close()
    return done / elapsed


async def proxy_send_rate(client: Client, users: list[tuple[str, str]], concurrency: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    done = 0
    failed = 0

    async def send_forever(index: int) -> None:
        nonlocal done, failed
        rng = random.Random(index)
        while time.monotonic() < deadline:
            (_, token), (other, _) = rng.sample(users, 2)
            status, _ = await client.call("POST", f"/dialog/{other}/send", proxy=index, token=token,
                                          body={"text": "hello, this is a message"})
            if status == 200:
                done += 1
            else:
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(send_forever(i) for i in range(concurrency)))
    if failed:
        raise RuntimeError(f"{failed} sends failed during the throughput run")
    return done / (time.monotonic() - started)


async def list_latencies(cluster: BenchCluster, client: Client, users: list[tuple[str, str]],
                         requests: int) -> tuple[float, float]:
    """p50 of the list query run directly on the owning shard, and through a proxy (sequential)."""
    from dialog_api.storage import _LIST, ordered
    from dialogs.shard_map import ShardMap

    (anna, token), (boris, _) = users[0], users[1]
    for i in range(50):
        await client.call("POST", f"/dialog/{boris}/send", token=token, body={"text": f"message {i}"})
    _, shard_map = await client.admin("GET", "/admin/map")
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    owner = ShardMap.from_json(shard_map).owner(key)
    con = await asyncpg.connect(cluster.dsn(owner))
    statement = await con.prepare(_LIST)
    direct = []
    for _ in range(requests):
        started = time.perf_counter()
        await statement.fetch(key, *ordered(uuid.UUID(anna), uuid.UUID(boris)), 2**63 - 1, 100)
        direct.append(time.perf_counter() - started)
    await con.close()
    via_proxy = []
    for _ in range(requests):
        started = time.perf_counter()
        status, _ = await client.call("GET", f"/dialog/{boris}/list", token=token)
        via_proxy.append(time.perf_counter() - started)
        assert status == 200
    return quantile(direct, 0.5), quantile(via_proxy, 0.5)


async def copy_rates(cluster: BenchCluster, client: Client) -> dict[str, Any]:
    """Add shard-3 (no other load): its copy phase's rate vs psql COPY between the same servers."""
    source, target = cluster.dsn("shard-1"), cluster.dsn("shard-3")
    con = await asyncpg.connect(source)
    rows = await con.fetchval("SELECT count(*) FROM messages")
    await con.close()
    # The target gets the shard schema when the migration prepares it; the baseline needs a table now.
    con = await asyncpg.connect(target)
    await con.execute(
        "CREATE TABLE bench_copy (dialog_key bigint, user_lo uuid, user_hi uuid, id bigint, from_lo boolean,"
        " text text, created_at timestamptz, idempotency_key text, PRIMARY KEY (dialog_key, user_lo, user_hi, id))"
    )
    await con.close()
    baseline_seconds = psql_copy(source, target, f"SELECT {COLUMNS} FROM messages", f"bench_copy ({COLUMNS})")
    con = await asyncpg.connect(target)
    await con.execute("DROP TABLE bench_copy")
    await con.close()

    cluster.start_worker("shard-3")
    status, migration = await client.admin("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": target})
    assert status == 202, migration
    seen = await client.follow(migration["migration_id"])
    result = seen["result"]
    assert result["phase"] == "done", result
    copy_seconds = seen["catchup"] - seen["copy"]
    return {
        "baseline_rows": rows,
        "baseline_seconds": baseline_seconds,
        "baseline_rows_per_second": rows / baseline_seconds,
        "migration_rows": result["rows_copied"],
        "migration_copy_seconds": copy_seconds,
        "migration_rows_per_second": result["rows_copied"] / copy_seconds,
        "ranges": result["ranges_total"],
    }


async def cutover_pause(client: Client, users: list[tuple[str, str]], concurrency: int,
                        method: str, path: str, body: Any = None) -> dict[str, Any]:
    """Run a migration while `concurrency` senders write; latency of sends in flight at its cutover."""
    stop = asyncio.Event()
    samples: list[tuple[float, float, int]] = []

    async def send_forever(index: int) -> None:
        rng = random.Random(100 + index)
        while not stop.is_set():
            (_, token), (other, _) = rng.sample(users, 2)
            started = time.monotonic()
            status, _ = await client.call("POST", f"/dialog/{other}/send", proxy=index, token=token,
                                          body={"text": "during the cutover"})
            samples.append((started, time.monotonic(), status))

    senders = [asyncio.ensure_future(send_forever(i)) for i in range(concurrency)]
    await asyncio.sleep(2)
    migration_started = time.monotonic()
    status, migration = await client.admin(method, path, body)
    assert status == 202, migration
    seen = await client.follow(migration["migration_id"])
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*senders)
    result = seen["result"]
    if result["phase"] != "done":
        raise RuntimeError(f"the migration did not finish: {result}")
    window = (seen["cutover"], (seen["cleanup"] if "cleanup" in seen else seen["done"]) + 0.05)
    during = [end - start for start, end, _ in samples if start <= window[1] and end >= window[0]]
    before = [end - start for start, end, _ in samples if end < migration_started]
    return {
        "migration": f"{result['kind']} {result['shard_id']}",
        "senders_in_flight": concurrency,
        "sends": len(samples),
        "failed": sum(1 for *_, s in samples if s != 200),
        "freeze_to_flip_ms": result["last_pause_ms"],
        "cutover_attempts": result["cutover_attempts"],
        "sends_overlapping_cutover": len(during),
        "pause_p50_ms": quantile(during, 0.5) * 1000,
        "pause_p99_ms": quantile(during, 0.99) * 1000,
        "pause_max_ms": max(during) * 1000 if during else float("nan"),
        "steady_p99_ms": quantile(before, 0.99) * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = scratch_folder("dialogs-bench-")
    try:
        cluster = BenchCluster(tmp)
        try:
            print("starting servers, workers and proxies…", flush=True)
            await cluster.start()
            await preload(cluster, args.rows)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = Client(session, cluster.proxy_urls)
                users = [await client.user(f"u{i}") for i in range(64)]

                print("1/4 send throughput…", flush=True)
                raw = await raw_insert_rate(cluster.dsn("shard-1"), args.concurrency, args.seconds)
                proxied = await proxy_send_rate(client, users, args.concurrency, args.seconds)

                print("2/4 list latency…", flush=True)
                direct_p50, proxy_p50 = await list_latencies(cluster, client, users, args.requests)

                print("3/4 resharding copy rate…", flush=True)
                copy = await copy_rates(cluster, client)

                print("4/4 cutover pause under load…", flush=True)
                # Once with headroom, once with the machine saturated (see steady_p99_ms).
                pauses = [
                    await cutover_pause(client, users, args.pause_concurrency, "DELETE", "/admin/shards/shard-3"),
                    await cutover_pause(client, users, args.concurrency, "POST", "/admin/shards",
                                        {"shard_id": "shard-3", "dsn": cluster.dsn("shard-3")}),
                ]
                runner_log = cluster.cutover_log()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "send_throughput": {
            "concurrency": args.concurrency,
            "raw_insert_per_second": round(raw),
            "proxy_send_per_second": round(proxied),
            "ratio": round(proxied / raw, 3),
            "target": ">= 1.0",
        },
        "list_latency": {
            "direct_p50_ms": round(direct_p50 * 1000, 3),
            "proxy_p50_ms": round(proxy_p50 * 1000, 3),
            "added_p50_ms": round((proxy_p50 - direct_p50) * 1000, 3),
            "target": "< 1.5 ms added",
        },
        "copy_rate": {
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in copy.items()},
            "ratio": round(copy["migration_rows_per_second"] / copy["baseline_rows_per_second"], 3),
            "target": ">= 0.5",
        },
        "cutover_pause": {
            "runs": [{k: round(v, 1) if isinstance(v, float) else v for k, v in pause.items()} for pause in pauses],
            "runner_log": runner_log,
            "target": "p99 < 250 ms, max < 1000 ms, no failed sends",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="messages preloaded per shard")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent senders / inserters")
    parser.add_argument("--pause-concurrency", type=int, default=8,
                        help="senders during the first measured cutover (the second uses --concurrency)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--requests", type=int, default=1000, help="sequential list requests per side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(results, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""How resharding's cost grows with data: add a shard over 100k and over 1M stored messages.

Each size gets a fresh cluster of two shards, preloaded with COPY, then ``shard-3`` is
added while senders write. The copy phase should take about linearly longer with the
rows it moves; the cutover pause (the write pause clients see) should not grow, since a
cutover moves only what was written since the catch-up began.

`python -m bench.growth --sizes 100000,20000000` runs the section alone, here with 10,000,000
stored messages on each of the two shards (rows past 2,000,000 per shard are generated
by the shards themselves, ``harness.preload``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from typing import Any

import aiohttp

from bench.harness import BenchCluster, Client, cutover_pause, preload
from dialogsctl.embedded import scratch_folder
from dialogsctl.supervisor import proxy_processes


async def add_shard_over(total_rows: int, senders: int) -> dict[str, Any]:
    tmp = scratch_folder("dialogs-growth-")
    cluster = BenchCluster(tmp, shards=2, spares=1)
    try:
        await cluster.start(proxies=1, processes=proxy_processes())
        await preload(cluster, total_rows // 2)
        async with aiohttp.ClientSession() as session:
            client = Client(session, cluster.proxy_urls)
            users = [await client.user(f"u{i}") for i in range(64)]
            cluster.start_worker("shard-3")
            pause = await cutover_pause(
                client, users, senders, "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.dsn("shard-3")}
            )
        return {
            "stored_messages": total_rows,
            "rows_copied": pause["rows_copied"],
            "copy_seconds": round(pause["copy_seconds"], 2),
            "copy_rows_per_second": round(pause["rows_copied"] / pause["copy_seconds"]),
            "freeze_to_flip_ms": pause["freeze_to_flip_ms"],
            "pause_p99_ms": round(pause["pause_p99_ms"], 1),
            "pause_max_ms": round(pause["pause_max_ms"], 1),
            "failed": pause["failed"],
            "runner_log": cluster.cutover_log(),  # freeze, verify and hand-over times
        }
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def growth(sizes: tuple[int, ...], senders: int) -> dict[str, Any]:
    runs = []
    for size in sizes:
        print(f"   add shard-3 over {size:,} stored messages…", flush=True)
        runs.append(await add_shard_over(size, senders))
    small, large = runs[0], runs[-1]
    return {
        "senders": senders,
        "runs": runs,
        "copy_time_ratio": round(large["copy_seconds"] / small["copy_seconds"], 2),
        "rows_ratio": round(large["rows_copied"] / small["rows_copied"], 2),
        "pause_p99_ratio": round(large["pause_p99_ms"] / small["pause_p99_ms"], 2),
        "target": "copy time about proportional to rows; the cutover pause does not grow",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated stored messages (both shards)")
    parser.add_argument("--senders", type=int, default=8, help="senders writing during the migration")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(","))
    print(json.dumps(asyncio.run(growth(sizes, args.senders)), indent=2))


if __name__ == "__main__":
    main()

"""What a synchronous standby costs: sends through a proxy over two shards, each a Patroni
primary with one synchronous standby, against the same cluster without standbys.

Both clusters are started here, one after the other, with the same shape (metadata on one
server, two shards, one worker per shard, one proxy) and the same wrk load, so the ratio
holds on a noisy machine; every commit of the replicated run waits for its standby's
flush, on the same two cores.
"""

from __future__ import annotations

import shutil
from typing import Any

import aiohttp

from bench import load
from bench.harness import BenchCluster, Client, send_requests
from dialogsctl.embedded import scratch_folder


async def _sends(replicas: int, connections: int, seconds: float) -> load.Load:
    tmp = scratch_folder("dialogs-bench-replicas-")
    cluster = BenchCluster(tmp, shards=2, spares=0, replicas=replicas)
    try:
        await cluster.start(proxies=1)
        cluster.wait_workers()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            client = Client(session, cluster.proxy_urls)
            users = [await client.user(f"u{i}") for i in range(64)]
        return load.wrk(cluster.proxy_urls[0], send_requests(users), connections, seconds)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def synchronous_cost(connections: int, seconds: float) -> dict[str, Any]:
    without = await _sends(0, connections, seconds)
    with_standby = await _sends(1, connections, seconds)
    return {
        "connections": connections,
        "without_standby": without.to_json(),
        "with_synchronous_standby": with_standby.to_json(),
        "ratio": round(with_standby.per_second / without.per_second, 3),
    }

"""Registrations of proxies and workers, kept fresh by heartbeats (``dialogs/heartbeat.py``).

Proxies route to the workers registered for a shard; a migration's cleanup waits until
every live proxy and worker has acknowledged the new map (``laggards``).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    shard_id: str
    url: str
    map_version: int
    age_seconds: float


class ShardNotRegistered(Exception):
    """A worker's shard is not in the registry yet: it started before `shard add` registered it."""


async def upsert_worker(con: asyncpg.Connection, worker_id: str, shard_id: str, url: str, map_version: int) -> None:
    """Register or refresh a worker; ShardNotRegistered (and nothing written, nothing in the
    server's log) while its shard is not registered."""
    registered = await con.fetchval(
        """
        INSERT INTO workers (worker_id, shard_id, url, map_version)
        SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM shards WHERE shard_id = $2)
        ON CONFLICT (worker_id) DO UPDATE
        SET url = EXCLUDED.url, map_version = EXCLUDED.map_version, heartbeat_at = now()
        RETURNING worker_id
        """,
        worker_id,
        shard_id,
        url,
        map_version,
    )
    if registered is None:
        raise ShardNotRegistered(f"shard {shard_id} is not registered yet: waiting for `dialogs shard add {shard_id}`")


async def delete_worker(con: asyncpg.Connection, worker_id: str) -> None:
    await con.execute("DELETE FROM workers WHERE worker_id = $1", worker_id)


async def upsert_proxy(con: asyncpg.Connection, proxy_id: str, url: str, map_version: int) -> None:
    await con.execute(
        """
        INSERT INTO proxies (proxy_id, url, map_version) VALUES ($1, $2, $3)
        ON CONFLICT (proxy_id) DO UPDATE SET url = EXCLUDED.url, map_version = EXCLUDED.map_version,
                                             heartbeat_at = now()
        """,
        proxy_id,
        url,
        map_version,
    )


async def delete_proxy(con: asyncpg.Connection, proxy_id: str) -> None:
    await con.execute("DELETE FROM proxies WHERE proxy_id = $1", proxy_id)


async def laggards(con: asyncpg.Connection, map_version: int, ttl_seconds: float) -> list[str]:
    """Live proxies and workers (heartbeat within ``ttl_seconds``) still on an older map."""
    rows = await con.fetch(
        """
        SELECT 'proxy ' || proxy_id AS name FROM proxies
        WHERE map_version < $1 AND heartbeat_at > now() - make_interval(secs => $2)
        UNION ALL
        SELECT 'worker ' || worker_id FROM workers
        WHERE map_version < $1 AND heartbeat_at > now() - make_interval(secs => $2)
        ORDER BY 1
        """,
        map_version,
        ttl_seconds,
    )
    return [row["name"] for row in rows]


async def workers(con: asyncpg.Connection) -> list[WorkerInfo]:
    rows = await con.fetch(
        "SELECT worker_id, shard_id, url, map_version,"
        " extract(epoch FROM now() - heartbeat_at)::float8 AS age FROM workers ORDER BY shard_id, worker_id"
    )
    return [WorkerInfo(r["worker_id"], r["shard_id"], r["url"], r["map_version"], r["age"]) for r in rows]


async def live_urls(con: asyncpg.Connection, role: str, ttl_seconds: float) -> list[str]:
    """URLs of the proxies (``role`` "proxy") or workers ("worker") heartbeating within ``ttl_seconds``."""
    table = {"proxy": "proxies", "worker": "workers"}[role]
    rows = await con.fetch(
        f"SELECT DISTINCT url FROM {table} WHERE url <> '' AND heartbeat_at > now() - make_interval(secs => $1)"
        " ORDER BY url",
        ttl_seconds,
    )
    return [row["url"] for row in rows]

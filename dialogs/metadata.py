"""SQL on the metadata database that both the proxy and the workers need.

Shard registry, shard-map versions (compare-and-swap) and worker registrations. The
proxy's own tables (users) live in ``proxy/storage.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from dialogs.shard_map import ShardMap

METADATA_MIGRATIONS = "dialogs.migrations.metadata"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    shard_id: str
    url: str
    map_version: int
    age_seconds: float


def _shard_map(row: asyncpg.Record | None) -> ShardMap | None:
    if row is None:
        return None
    return ShardMap.from_json(
        {"map_version": row["map_version"], "vnodes_base": row["vnodes_base"], "shards": json.loads(row["shards"])}
    )


async def active_map(con: asyncpg.Connection) -> ShardMap | None:
    return _shard_map(await con.fetchrow(
        "SELECT map_version, shards, vnodes_base FROM shard_maps ORDER BY map_version DESC LIMIT 1"
    ))


# Compare-and-swap write of a map version ($1 version, $2 shards, $3 vnodes_base, $4 reason):
# the primary key settles two writers racing for one version; the WHERE clause refuses a
# version that does not follow the latest. Also embedded by the migration flip, which adds
# a condition of its own.
def cas_insert_map(condition: str = "true") -> str:
    return f"""
INSERT INTO shard_maps (map_version, shards, vnodes_base, reason)
SELECT $1::bigint, $2::jsonb, $3::integer, $4::text
WHERE coalesce((SELECT max(map_version) FROM shard_maps), 0) = $1::bigint - 1 AND ({condition})
ON CONFLICT (map_version) DO NOTHING
"""


CAS_INSERT_MAP = cas_insert_map()


def map_arguments(new: ShardMap, reason: str) -> tuple[int, str, int, str]:
    return new.map_version, json.dumps(new.to_json()["shards"]), new.vnodes_base, reason


async def insert_shard_map(con: asyncpg.Connection, new: ShardMap, reason: str = "") -> bool:
    """Write ``new`` if the active version is still ``new.map_version - 1``; False if another won."""
    return await con.execute(CAS_INSERT_MAP, *map_arguments(new, reason)) == "INSERT 0 1"


async def register_shard(con: asyncpg.Connection, shard_id: str, dsn: str) -> None:
    await con.execute(
        "INSERT INTO shards (shard_id, dsn) VALUES ($1, $2) ON CONFLICT (shard_id) DO UPDATE SET dsn = EXCLUDED.dsn",
        shard_id,
        dsn,
    )


async def shard_dsns(con: asyncpg.Connection) -> dict[str, str]:
    return {row["shard_id"]: row["dsn"] for row in await con.fetch("SELECT shard_id, dsn FROM shards")}


async def bootstrap(con: asyncpg.Connection, shards: dict[str, str]) -> ShardMap:
    """Register ``shards`` (id -> DSN) and, on an empty cluster, write map version 1 over them.

    Idempotent: on a cluster that already has a map, DSNs are refreshed and the map is kept.
    """
    async with con.transaction():
        for shard_id, dsn in shards.items():
            await register_shard(con, shard_id, dsn)
        current = await active_map(con)
        if current is not None:
            return current
        first = ShardMap(1, dict.fromkeys(sorted(shards), 1))
        if not await insert_shard_map(con, first, reason="bootstrap"):
            raise RuntimeError("another process bootstrapped the shard map at the same time")
        return first


async def upsert_worker(con: asyncpg.Connection, worker_id: str, shard_id: str, url: str, map_version: int) -> None:
    await con.execute(
        """
        INSERT INTO workers (worker_id, shard_id, url, map_version) VALUES ($1, $2, $3, $4)
        ON CONFLICT (worker_id) DO UPDATE
        SET url = EXCLUDED.url, map_version = EXCLUDED.map_version, heartbeat_at = now()
        """,
        worker_id,
        shard_id,
        url,
        map_version,
    )


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


async def shard_map_version(con: asyncpg.Connection, map_version: int) -> ShardMap | None:
    return _shard_map(await con.fetchrow(
        "SELECT map_version, shards, vnodes_base FROM shard_maps WHERE map_version = $1", map_version
    ))


async def workers(con: asyncpg.Connection) -> list[WorkerInfo]:
    rows = await con.fetch(
        "SELECT worker_id, shard_id, url, map_version,"
        " extract(epoch FROM now() - heartbeat_at)::float8 AS age FROM workers ORDER BY shard_id, worker_id"
    )
    return [WorkerInfo(r["worker_id"], r["shard_id"], r["url"], r["map_version"], r["age"]) for r in rows]

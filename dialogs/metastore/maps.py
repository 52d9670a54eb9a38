"""The shard registry and the versioned shard maps.

A new map version is written in one way only: ``activate``, a compare-and-swap on the
version (the active version must still be the one before it), which raises
``MapVersionConflict`` when another writer got there first. The migration flip embeds
the same statement (``activate_sql``) with a condition of its own.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg

from dialogs import errors
from dialogs.shard_map import METADATA_NAME, ShardMap


def _shard_map(row: asyncpg.Record | None) -> ShardMap | None:
    if row is None:
        return None
    return ShardMap.from_json(
        {"map_version": row["map_version"], "vnodes_base": row["vnodes_base"], "shards": json.loads(row["shards"])}
    )


async def active_map(con: asyncpg.Connection) -> ShardMap | None:
    return _shard_map(
        await con.fetchrow("SELECT map_version, shards, vnodes_base FROM shard_maps ORDER BY map_version DESC LIMIT 1")
    )


async def newer_map(con: asyncpg.Connection, current: ShardMap | None) -> ShardMap | None:
    """The active map if it is newer than ``current`` (None otherwise), its ring built.

    A ring is built on its first lookup; a process that swapped a new map in unbuilt
    would build it in its event loop on the next request: 140 ms of nothing else at 64
    shards, 660 ms at 256 (docs/capacity.md). Built here, in a thread, before the caller
    swaps it in, requests go on meanwhile with the map they have."""
    fresh = await active_map(con)
    if fresh is None or (current is not None and fresh.map_version <= current.map_version):
        return None
    await asyncio.to_thread(lambda: fresh.ring)
    return fresh


def activate_sql(condition: str = "true") -> str:
    """The compare-and-swap write of a map version ($1 version, $2 shards, $3 vnodes_base,
    $4 reason), RETURNING map_version when it won. The primary key settles two writers
    racing for one version; the WHERE clause refuses a version that does not follow the
    active one, and whatever ``condition`` adds."""
    return f"""
INSERT INTO shard_maps (map_version, shards, vnodes_base, reason)
SELECT $1::bigint, $2::jsonb, $3::integer, $4::text
WHERE coalesce((SELECT max(map_version) FROM shard_maps), 0) = $1::bigint - 1 AND ({condition})
ON CONFLICT (map_version) DO NOTHING
RETURNING map_version
"""


def activate_arguments(new: ShardMap, reason: str) -> tuple[int, str, int, str]:
    return new.map_version, json.dumps(new.to_json()["shards"]), new.vnodes_base, reason


async def activate(con: asyncpg.Connection, new: ShardMap, reason: str) -> None:
    """Make ``new`` the active map if the active version is still ``new.map_version - 1``."""
    if await con.fetchval(activate_sql(), *activate_arguments(new, reason)) is None:
        raise errors.MapVersionConflict(f"map version {new.map_version - 1} is no longer the active one")


async def register_shard(con: asyncpg.Connection, shard_id: str, dsn: str, *, reactivate: bool = False) -> None:
    """Record (or update) a shard's DSN. A retired shard stays retired unless ``reactivate``
    (an operator adds it again); bootstrapping only refreshes DSNs."""
    await con.execute(
        "INSERT INTO shards (shard_id, dsn) VALUES ($1, $2) ON CONFLICT (shard_id) DO UPDATE"
        " SET dsn = EXCLUDED.dsn, retired_at = CASE WHEN $3 THEN NULL ELSE shards.retired_at END",
        shard_id,
        dsn,
        reactivate,
    )


async def retire_shard(con: asyncpg.Connection, shard_id: str) -> None:
    await con.execute("UPDATE shards SET retired_at = now() WHERE shard_id = $1", shard_id)


async def registered_shards(con: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every shard ever registered: shard_id, dsn, retired_at."""
    return await con.fetch("SELECT shard_id, dsn, retired_at FROM shards ORDER BY shard_id")


async def set_patroni_urls(con: asyncpg.Connection, shard_id: str, urls: list[str]) -> None:
    """Record the Patroni REST API of each member of a replicated shard."""
    await con.execute("UPDATE shards SET patroni_urls = $2 WHERE shard_id = $1", shard_id, urls)


async def patroni_urls(con: asyncpg.Connection, shard_id: str) -> list[str] | None:
    """A shard's Patroni members' REST URLs ([] for a shard of one server); None if unknown."""
    row = await con.fetchrow("SELECT patroni_urls FROM shards WHERE shard_id = $1", shard_id)
    return None if row is None else list(row["patroni_urls"])


async def set_metadata_patroni_urls(con: asyncpg.Connection, urls: list[str]) -> None:
    """Record the Patroni REST API of each member of the metadata database's own group."""
    async with con.transaction():
        await con.execute("DELETE FROM metadata_patroni_urls")
        await con.executemany("INSERT INTO metadata_patroni_urls (url) VALUES ($1)", [(url,) for url in urls])


async def metadata_patroni_urls(con: asyncpg.Connection) -> list[str]:
    """The metadata group's Patroni members' REST URLs ([]: one server, no Patroni)."""
    return [row["url"] for row in await con.fetch("SELECT url FROM metadata_patroni_urls ORDER BY url")]


async def patroni_groups(con: asyncpg.Connection) -> dict[str, list[str]]:
    """Every replicated database's Patroni members' REST URLs: the metadata group's (as
    ``METADATA_NAME``) and each serving shard's (a retired shard's members are gone)."""
    rows = await con.fetch(
        "SELECT $1::text AS name, array_agg(url ORDER BY url) AS urls FROM metadata_patroni_urls HAVING count(*) > 0"
        " UNION ALL SELECT shard_id, patroni_urls FROM shards"
        " WHERE retired_at IS NULL AND cardinality(patroni_urls) > 0 ORDER BY 1",
        METADATA_NAME,
    )
    return {row["name"]: list(row["urls"]) for row in rows}


async def patroni_targets(con: asyncpg.Connection) -> list[str]:
    """The REST URL of every Patroni member to scrape (``patroni_groups``)."""
    return sorted({url for urls in (await patroni_groups(con)).values() for url in urls})


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
        await activate(con, first, reason="bootstrap")
        return first


async def shard_map_version(con: asyncpg.Connection, map_version: int) -> ShardMap | None:
    return _shard_map(
        await con.fetchrow(
            "SELECT map_version, shards, vnodes_base FROM shard_maps WHERE map_version = $1", map_version
        )
    )

"""Bring a cluster's databases to a servable state: schemas, the first map, range ownership.

Idempotent; used by `dialogs migrate`, the local supervisor and the tests.
"""

from __future__ import annotations

import asyncpg

from dialogs import metadata, pgmigrate, shard_control
from dialogs.shard_map import ShardMap


async def bootstrap(metadata_dsn: str, shards: dict[str, str]) -> ShardMap:
    """Migrate the metadata database and ``shards`` (id -> DSN); on an empty cluster write map 1.

    Shards of the active map whose range table is empty are given their ranges (a fresh
    cluster); shards that already have ranges are left alone.
    """
    con = await asyncpg.connect(metadata_dsn)
    try:
        await pgmigrate.apply(con, metadata.METADATA_MIGRATIONS)
        active = await metadata.bootstrap(con, shards)
    finally:
        await con.close()
    ranges = active.ring.ranges()
    for shard_id, dsn in shards.items():
        shard = await asyncpg.connect(dsn)
        try:
            await shard_control.migrate(shard)
            if shard_id in active.weights:
                spans = [shard_control.Span(r.lo, r.hi) for r in ranges if r.shard_id == shard_id]
                await shard_control.claim_if_empty(shard, spans)
        finally:
            await shard.close()
    return active

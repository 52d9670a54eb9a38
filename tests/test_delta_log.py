"""The catch-up log: a row whose transaction commits late must not be skipped."""

from __future__ import annotations

import uuid

import asyncpg

from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key
from dialogs.metastore.migrations import START
from dialogs.migration_plan import Span
from proxy.bootstrap import bootstrap
from proxy.migration import shard_sql
from tests.support import Cluster


async def _store(con: asyncpg.Connection, text: str) -> None:
    a, b = sorted((uuid.uuid4(), uuid.uuid4()))
    await con.fetch(
        "SELECT * FROM store_messages($1, $2, $3, $4, $5, $6)", [dialog_key(a, b)], [a], [b], [True], [text], [None]
    )


async def test_late_commit_is_not_skipped(bare_cluster: Cluster) -> None:
    """T1 logs first but commits after T2: reading the log in between must not move past T1's row."""
    await bootstrap(bare_cluster.metadata_dsn, bare_cluster.shard_dsns)
    dsn = bare_cluster.shard_dsns["shard-1"]
    admin, first, second = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        everything = [Span(INT64_MIN, INT64_MAX)]
        await admin.execute("DELETE FROM shard_ranges")
        await shard_sql.set_state(admin, everything, "migrating")
        late = first.transaction()
        await late.start()
        await _store(first, "logged first, committed last")
        await _store(second, "logged second, committed first")

        watermark = START
        seen = []
        rows = await shard_sql.read_delta(admin, watermark, 100)
        seen += [row["text"] for row in rows]
        if rows:
            watermark = shard_sql.watermark_of(rows[-1])
        await late.commit()
        rows = await shard_sql.read_delta(admin, watermark, 100)
        seen += [row["text"] for row in rows]
        assert sorted(seen) == ["logged first, committed last", "logged second, committed first"]
    finally:
        for con in (admin, first, second):
            await con.close()

"""The migration record in the metadata database: an abort and the flip cannot both win."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dialogs import errors
from dialogs.metastore import maps, migrations
from tests.support import Cluster


@pytest.fixture
async def meta(bare_cluster: Cluster) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two connections to a bootstrapped metadata database."""
    first = await asyncpg.connect(bare_cluster.metadata_dsn)
    second = await asyncpg.connect(bare_cluster.metadata_dsn)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def _add_shard_3(con: asyncpg.Connection) -> migrations.Migration:
    current = await maps.active_map(con)
    assert current is not None
    return await migrations.create(con, "add", "shard-3", current.with_shard("shard-3", 1), current, 0, 5000)


async def test_an_abort_request_stops_the_flip(meta: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    """Abort requested first: the flip activates no map and the migration stays abortable."""
    con, _ = meta
    migration = await _add_shard_3(con)
    await migrations.request_abort(con, migration.migration_id)
    with pytest.raises(errors.Conflict):
        await migrations.flip(con, migration, 12.0)
    assert (await maps.active_map(con)).map_version == migration.from_version  # type: ignore[union-attr]


async def test_an_abort_racing_the_flip_is_refused(meta: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    """Abort asked while the flip's transaction is open: it waits, then is a 409; the flip stands."""
    flipper, operator = meta
    migration = await _add_shard_3(flipper)
    async with flipper.transaction():
        await migrations.flip(flipper, migration, 12.0)
        abort = asyncio.ensure_future(migrations.request_abort(operator, migration.migration_id))
        await asyncio.sleep(0.3)
        assert not abort.done()  # it waits for the flip's row lock
    with pytest.raises(errors.Conflict, match="can no longer be aborted"):
        await abort
    after = await migrations.get(flipper, migration.migration_id)
    assert after is not None and after.phase == "cleanup" and not after.abort_requested
    assert (await maps.active_map(flipper)).map_version == migration.target_map.map_version  # type: ignore[union-attr]

"""The migration record in the metadata database: an abort and the flip cannot both win."""

from __future__ import annotations

import asyncio
import datetime
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


def _later(seconds: float = 60.0) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


async def _flip(
    con: asyncpg.Connection, migration: migrations.Migration, by: datetime.datetime | None = None, within: float = 5.0
) -> None:
    await migrations.flip(con, migration, by or _later(), within, {"shard-1": (7, 9)})


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
        await _flip(con, migration)
    assert (await maps.active_map(con)).map_version == migration.from_version  # type: ignore[union-attr]


async def test_an_abort_racing_the_flip_is_refused(meta: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    """Abort asked while the flip's transaction is open: it waits, then is a 409; the flip stands."""
    flipper, operator = meta
    migration = await _add_shard_3(flipper)
    async with flipper.transaction():
        await _flip(flipper, migration)
        abort = asyncio.ensure_future(migrations.request_abort(operator, migration.migration_id))
        await asyncio.sleep(0.3)
        assert not abort.done()  # it waits for the flip's row lock
    with pytest.raises(errors.Conflict, match="can no longer be aborted"):
        await abort
    after = await migrations.get(flipper, migration.migration_id)
    assert after is not None and after.phase == "cleanup" and not after.abort_requested
    assert (await maps.active_map(flipper)).map_version == migration.target_map.map_version  # type: ignore[union-attr]


async def test_a_flip_after_the_sources_leases_activates_nothing(
    meta: tuple[asyncpg.Connection, asyncpg.Connection],
) -> None:
    """The flip is refused once the metadata server's clock is past ``by`` (the sources' leases,
    less a margin): the sources serve again by then, so the new map must never appear."""
    con, _ = meta
    migration = await _add_shard_3(con)
    with pytest.raises(errors.Conflict, match="leases ran out"):
        await _flip(con, migration, by=_later(-0.001))
    assert (await maps.active_map(con)).map_version == migration.from_version  # type: ignore[union-attr]
    after = await migrations.get(con, migration.migration_id)
    assert after is not None and after.phase == "prepare"


async def test_a_flip_waiting_on_a_locked_row_gives_up_in_time(
    meta: tuple[asyncpg.Connection, asyncpg.Connection],
) -> None:
    """A migration row held by someone else (a stuck session) makes the flip fail within its
    bound, with nothing written, instead of committing after the leases ended."""
    flipper, other = meta
    migration = await _add_shard_3(flipper)
    async with other.transaction():
        await other.execute("SELECT 1 FROM migrations WHERE migration_id = $1 FOR UPDATE", migration.migration_id)
        started = asyncio.get_running_loop().time()
        with pytest.raises((asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError)):
            await _flip(flipper, migration, within=0.3)
        assert asyncio.get_running_loop().time() - started < 3.0
    assert (await maps.active_map(flipper)).map_version == migration.from_version  # type: ignore[union-attr]


async def test_the_flip_keeps_the_final_watermarks(meta: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    """The flip stores how far each source's delta was copied: cleanup copies anything past it."""
    con, _ = meta
    migration = await _add_shard_3(con)
    await _flip(con, migration)
    after = await migrations.get(con, migration.migration_id)
    assert after is not None and after.phase == "cleanup" and after.delta_watermark == {"shard-1": (7, 9)}


async def test_a_newer_map_arrives_with_its_ring_built(meta: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    """What proxies and workers swap in (maps.newer_map): only a version newer than theirs,
    and with its ring already built, so no request pays for building it (docs/capacity.md)."""
    con, _ = meta
    current = await maps.active_map(con)
    assert current is not None
    assert await maps.newer_map(con, current) is None
    await maps.activate(con, current.with_weight("shard-1", 2), "test")
    fresh = await maps.newer_map(con, current)
    assert fresh is not None and fresh.map_version == current.map_version + 1
    assert "ring" in vars(fresh)  # built: cached_property keeps it in the instance's __dict__
    assert fresh.owner(0) in fresh.weights
    assert await maps.newer_map(con, fresh) is None

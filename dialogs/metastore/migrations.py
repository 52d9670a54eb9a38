"""Migrations (resharding) in the metadata database: create, read, checkpoint, flip, finish."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import asyncpg

from dialogs import errors
from dialogs.metastore import maps
from dialogs.migration_plan import Move, moves
from dialogs.shard_map import ShardMap
from dialogs.wire import ABORTABLE_PHASES, FINISHED_PHASES, Phase

# One lease for the whole cluster, so one migration runs at a time: a session advisory
# lock, which PostgreSQL releases the moment its connection dies (also on kill -9).
MIGRATION_LEASE = 0x6469616C6F67

Cursor = tuple[int, object, object, int] | None  # the last copied primary key, or None
# How far a source's delta log has been copied: (transaction id, sequence) of the last row.
Watermark = tuple[int, int]
START: Watermark = (0, 0)


@dataclass(frozen=True)
class Migration:
    migration_id: int
    kind: str
    shard_id: str
    from_version: int
    target_map: ShardMap
    phase: Phase
    abort_requested: bool
    rows_per_second: int
    batch_size: int
    rows_total: int
    rows_copied: int
    delta_copied: int
    delta_watermark: dict[str, Watermark]
    cutover_attempts: int
    last_pause_ms: float | None
    error: str | None
    elapsed_seconds: float


@dataclass
class RangeCopy:
    """How far one moving range is copied (its checkpoint); the range's ownership on a shard
    is another thing (``wire.Ownership``)."""

    move: Move
    rows_estimate: int
    cursor: Cursor
    copied: bool


_COLUMNS = """migration_id, kind, shard_id, from_version, target_map, phase, abort_requested, rows_per_second,
    batch_size, rows_total, rows_copied, delta_copied, delta_watermark, cutover_attempts, last_pause_ms, error,
    extract(epoch FROM coalesce(finished_at, now()) - created_at)::float8 AS elapsed"""


def _migration(row: asyncpg.Record) -> Migration:
    return Migration(
        migration_id=row["migration_id"],
        kind=row["kind"],
        shard_id=row["shard_id"],
        from_version=row["from_version"],
        target_map=ShardMap.from_json(json.loads(row["target_map"])),
        phase=Phase(row["phase"]),
        abort_requested=row["abort_requested"],
        rows_per_second=row["rows_per_second"],
        batch_size=row["batch_size"],
        rows_total=row["rows_total"],
        rows_copied=row["rows_copied"],
        delta_copied=row["delta_copied"],
        delta_watermark={k: (int(v[0]), int(v[1])) for k, v in json.loads(row["delta_watermark"]).items()},
        cutover_attempts=row["cutover_attempts"],
        last_pause_ms=row["last_pause_ms"],
        error=row["error"],
        elapsed_seconds=row["elapsed"],
    )


async def take_lease(con: asyncpg.Connection) -> bool:
    """Hold the migration lease for as long as ``con`` lives; False if another runner has it."""
    return await con.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LEASE)


async def create(
    con: asyncpg.Connection,
    kind: str,
    shard_id: str,
    target: ShardMap,
    current: ShardMap,
    rows_per_second: int,
    batch_size: int,
) -> Migration:
    """Record a migration from ``current`` to ``target`` with its planned moves; 409 if one is active."""
    plan = moves(current.ring, target.ring)
    try:
        async with con.transaction():
            migration_id = await con.fetchval(
                "INSERT INTO migrations (kind, shard_id, from_version, target_map, rows_per_second, batch_size)"
                " VALUES ($1, $2, $3, $4::jsonb, $5, $6) RETURNING migration_id",
                kind,
                shard_id,
                current.map_version,
                json.dumps(target.to_json()),
                rows_per_second,
                batch_size,
            )
            await con.execute(
                "INSERT INTO migration_ranges (migration_id, lo, hi, source, target)"
                " SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[])",
                migration_id,
                [m.lo for m in plan],
                [m.hi for m in plan],
                [m.source for m in plan],
                [m.target for m in plan],
            )
    except asyncpg.UniqueViolationError:
        running = await active(con)
        raise errors.Conflict(
            f"migration {running.migration_id if running else '?'} is still running; one at a time"
        ) from None
    migration = await get(con, migration_id)
    assert migration is not None
    return migration


async def get(con: asyncpg.Connection, migration_id: int) -> Migration | None:
    row = await con.fetchrow(f"SELECT {_COLUMNS} FROM migrations WHERE migration_id = $1", migration_id)
    return _migration(row) if row else None


async def active(con: asyncpg.Connection) -> Migration | None:
    row = await con.fetchrow(
        f"SELECT {_COLUMNS} FROM migrations WHERE phase <> ALL($1::text[]) ORDER BY migration_id DESC LIMIT 1",
        FINISHED_PHASES,
    )
    return _migration(row) if row else None


async def recent(con: asyncpg.Connection, limit: int = 20) -> list[Migration]:
    rows = await con.fetch(f"SELECT {_COLUMNS} FROM migrations ORDER BY migration_id DESC LIMIT $1", limit)
    return [_migration(row) for row in rows]


async def range_counts(con: asyncpg.Connection, migration_id: int) -> tuple[int, int]:
    row = await con.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE copied) AS copied FROM migration_ranges"
        " WHERE migration_id = $1",
        migration_id,
    )
    return row["total"], row["copied"]


async def ranges(con: asyncpg.Connection, migration_id: int) -> list[RangeCopy]:
    rows = await con.fetch("SELECT * FROM migration_ranges WHERE migration_id = $1 ORDER BY lo", migration_id)
    return [
        RangeCopy(
            Move(r["lo"], r["hi"], r["source"], r["target"]),
            r["rows_estimate"],
            None if r["cursor_key"] is None else (r["cursor_key"], r["cursor_lo"], r["cursor_hi"], r["cursor_id"]),
            r["copied"],
        )
        for r in rows
    ]


async def set_estimates(con: asyncpg.Connection, migration_id: int, estimates: dict[int, int]) -> None:
    async with con.transaction():
        await con.execute(
            "UPDATE migration_ranges r SET rows_estimate = e.n"
            " FROM unnest($2::bigint[], $3::bigint[]) AS e(lo, n) WHERE r.migration_id = $1 AND r.lo = e.lo",
            migration_id,
            list(estimates),
            list(estimates.values()),
        )
        await con.execute(
            "UPDATE migrations SET rows_total = $2, updated_at = now() WHERE migration_id = $1",
            migration_id,
            sum(estimates.values()),
        )


async def checkpoint(
    con: asyncpg.Connection, migration_id: int, los: list[int], cursor: Cursor, copied: bool, rows: int
) -> None:
    """Record a committed copy batch: the ranges it finished (or the cursor of the one it advanced)."""
    key = cursor or (None, None, None, None)
    async with con.transaction():
        await con.execute(
            "UPDATE migration_ranges SET copied = $3, cursor_key = $4, cursor_lo = $5, cursor_hi = $6,"
            " cursor_id = $7 WHERE migration_id = $1 AND lo = ANY($2::bigint[])",
            migration_id,
            los,
            copied,
            *key,
        )
        await con.execute(
            "UPDATE migrations SET rows_copied = rows_copied + $2, updated_at = now() WHERE migration_id = $1",
            migration_id,
            rows,
        )


async def save_delta(con: asyncpg.Connection, migration_id: int, watermarks: dict[str, Watermark], rows: int) -> None:
    await con.execute(
        "UPDATE migrations SET delta_watermark = $2::jsonb, delta_copied = delta_copied + $3, updated_at = now()"
        " WHERE migration_id = $1",
        migration_id,
        _watermarks_json(watermarks),
        rows,
    )


def _watermarks_json(watermarks: dict[str, Watermark]) -> str:
    return json.dumps({k: list(v) for k, v in watermarks.items()})


async def set_phase(con: asyncpg.Connection, migration_id: int, phase: Phase, error: str | None = None) -> None:
    await con.execute(
        "UPDATE migrations SET phase = $2, error = coalesce($3, error), updated_at = now(),"
        " finished_at = CASE WHEN $4 THEN now() END WHERE migration_id = $1",
        migration_id,
        phase,
        error,
        phase.finished,
    )


async def cutover_failed(con: asyncpg.Connection, migration_id: int, reason: str) -> int:
    """Back to catch-up after a failed cutover; the attempts so far. Only from the cutover
    phase: a flip that did commit (its answer lost) must never be undone here."""
    attempts = await con.fetchval(
        "UPDATE migrations SET cutover_attempts = cutover_attempts + 1, phase = $3, error = $2,"
        " updated_at = now() WHERE migration_id = $1 AND phase = $4 RETURNING cutover_attempts",
        migration_id,
        reason,
        Phase.CATCHUP,
        Phase.CUTOVER,
    )
    if attempts is None:
        raise errors.Conflict(f"migration {migration_id} is no longer in its cutover")
    return int(attempts)


async def flip(
    con: asyncpg.Connection,
    migration: Migration,
    by: datetime.datetime,
    within: float,
    watermarks: dict[str, Watermark],
) -> None:
    """The point of no return: activate the target map (compare-and-swap) and enter cleanup,
    only while the metadata server's clock is before ``by`` (the sources' leases end, less a
    margin) and within ``within`` seconds of waiting. ``watermarks`` (each source's delta log
    as far as the final copy took it) are kept for cleanup's check for late writes.

    The row is locked first, in a statement of its own, so the clock is read after any wait
    for the lock; the flip is then one statement and the commit follows at once.
    """
    timeout_ms = max(1, int(within * 1000))
    async with con.transaction():
        await con.execute(f"SET LOCAL statement_timeout = {timeout_ms}; SET LOCAL lock_timeout = {timeout_ms}")
        # Locks the row against request_abort: whichever commits first wins, the other
        # sees its result (an abort request stops the flip; a flip makes the abort a 409).
        allowed = await con.fetchval(
            "SELECT NOT abort_requested FROM migrations WHERE migration_id = $1 FOR UPDATE", migration.migration_id
        )
        flipped = allowed and await con.fetchval(
            f"""
            WITH activated AS ({maps.activate_sql("clock_timestamp() < $8")})
            UPDATE migrations SET phase = $7, delta_watermark = $6::jsonb, error = NULL, updated_at = now()
            WHERE migration_id = $5 AND EXISTS (SELECT 1 FROM activated)
            RETURNING migration_id
            """,
            *maps.activate_arguments(migration.target_map, f"migration {migration.migration_id}"),
            migration.migration_id,
            _watermarks_json(watermarks),
            Phase.CLEANUP,
            by,
        )
    if not flipped:
        raise errors.MapVersionConflict(
            "the shard map changed under the migration, an abort was requested, or the sources' leases ran out"
        )


async def confirm_flip(con: asyncpg.Connection, migration_id: int) -> None:
    """Return once the flip is on the metadata database's synchronous standby, if it has one.

    The flip commits under a time bound, and a bound that runs out while the commit waits
    for the standby leaves it on the primary alone: a failover then would forget it while
    the sources hand their ranges over. This is a later write of the migration's row with a
    synchronous commit that nothing cuts short (no statement timeout): the standby flushes
    WAL in order, so once it has this commit it has the flip too. Without a synchronous
    standby (``synchronous_standby_names`` empty) it returns at once. A caller that gives
    up waiting (a cancel) learns nothing and must ask again. (A cancel by someone else, an
    operator's ``pg_cancel_backend``, would end the wait with a success: PostgreSQL keeps
    such a commit and only warns.)
    """
    async with con.transaction():
        await con.execute("SET LOCAL statement_timeout = 0; SET LOCAL synchronous_commit = on")
        status = await con.execute("UPDATE migrations SET updated_at = now() WHERE migration_id = $1", migration_id)
        if status != "UPDATE 1":  # no row written, no WAL: nothing would have been waited for
            raise errors.MigrationNotFound(f"no migration {migration_id} to confirm its flip with")


async def record_pause(con: asyncpg.Connection, migration_id: int, pause_ms: float) -> None:
    """The write pause clients saw at the cutover: from the freeze until the flip committed."""
    await con.execute("UPDATE migrations SET last_pause_ms = $2 WHERE migration_id = $1", migration_id, pause_ms)


async def request_abort(con: asyncpg.Connection, migration_id: int) -> Migration:
    # One conditional UPDATE: it waits for a flip holding the row, then sees its phase.
    requested = await con.fetchval(
        "UPDATE migrations SET abort_requested = true, updated_at = now()"
        " WHERE migration_id = $1 AND phase = ANY($2::text[]) RETURNING migration_id",
        migration_id,
        ABORTABLE_PHASES,
    )
    migration = await get(con, migration_id)
    if migration is None:
        raise errors.MigrationNotFound(f"no migration {migration_id}")
    if requested is None:
        raise errors.Conflict(f"migration {migration_id} is in phase {migration.phase} and can no longer be aborted")
    return migration


async def set_throttle(
    con: asyncpg.Connection, migration_id: int, rows_per_second: int | None, batch_size: int | None
) -> Migration:
    await con.execute(
        "UPDATE migrations SET rows_per_second = coalesce($2, rows_per_second),"
        " batch_size = coalesce($3, batch_size), updated_at = now() WHERE migration_id = $1",
        migration_id,
        rows_per_second,
        batch_size,
    )
    migration = await get(con, migration_id)
    if migration is None:
        raise errors.MigrationNotFound(f"no migration {migration_id}")
    return migration

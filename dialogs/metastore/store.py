"""The metadata database as a proxy's request handlers use it: one object, one pool.

``MetadataStore`` owns the pool, turns the database's failures into the project's own
(503 ``MetadataUnavailable``, through ``dialogs.pg``) and is the one way handlers reach
the metadata database: users, shards and maps, registrations, migrations. The SQL itself
lives in the modules beside this one (``users``, ``maps``, ``members``, ``migrations``),
as functions of a connection, because the migration runner and the watchers run the same
queries on connections of their own (a lease, a LISTEN). Shaping public JSON is the
serving side's job (``proxy/handlers.py``, ``proxy/admin.py``), not this one's.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from dialogs import errors, pg
from dialogs.metastore import maps, members, migrations, users
from dialogs.shard_map import ShardMap


class MetadataStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for several statements in a row; failures as 503s."""
        async with pg.translated(errors.MetadataUnavailable), self._pool.acquire() as con:
            yield con

    # --- users --------------------------------------------------------------------------

    async def create_user(self, user: users.NewUser, password_hash: str) -> uuid.UUID:
        async with self.connection() as con:
            return await users.create(con, user, password_hash)

    async def password_hash(self, user_id: uuid.UUID) -> str | None:
        async with self.connection() as con:
            return await users.password_hash(con, user_id)

    async def user(self, user_id: uuid.UUID) -> asyncpg.Record | None:
        async with self.connection() as con:
            return await users.get(con, user_id)

    async def user_exists(self, user_id: uuid.UUID) -> bool:
        async with self.connection() as con:
            return await users.exists(con, user_id)

    async def search_users(self, first_name: str, second_name: str, limit: int) -> list[asyncpg.Record]:
        async with self.connection() as con:
            return await users.search(con, first_name, second_name, limit)

    # --- shards, maps, registrations ------------------------------------------------------

    async def active_map(self) -> ShardMap:
        """The active shard map; 503 while the cluster has none yet."""
        async with self.connection() as con:
            current = await maps.active_map(con)
        if current is None:
            raise errors.Unavailable("the cluster has no shard map yet")
        return current

    async def registered_shards(self) -> list[asyncpg.Record]:
        async with self.connection() as con:
            return list(await maps.registered_shards(con))

    async def patroni_urls(self, shard_id: str) -> list[str] | None:
        async with self.connection() as con:
            return await maps.patroni_urls(con, shard_id)

    async def register_shard(self, shard_id: str, dsn: str, patroni_urls: list[str] | None = None) -> None:
        """Record a shard an operator adds (a retired one comes back), with its Patroni
        members' REST URLs when it is replicated."""
        async with self.connection() as con, con.transaction():
            await maps.register_shard(con, shard_id, dsn, reactivate=True)
            await maps.set_patroni_urls(con, shard_id, patroni_urls or [])

    async def metadata_patroni_urls(self) -> list[str]:
        async with self.connection() as con:
            return await maps.metadata_patroni_urls(con)

    async def patroni_groups(self) -> dict[str, list[str]]:
        async with self.connection() as con:
            return await maps.patroni_groups(con)

    async def patroni_targets(self) -> list[str]:
        async with self.connection() as con:
            return await maps.patroni_targets(con)

    async def workers(self) -> list[members.WorkerInfo]:
        async with self.connection() as con:
            return await members.workers(con)

    async def live_urls(self, role: str, ttl_seconds: float) -> list[str]:
        async with self.connection() as con:
            return await members.live_urls(con, role, ttl_seconds)

    # --- migrations -------------------------------------------------------------------------

    async def start_migration(
        self, kind: str, shard_id: str, target: ShardMap, current: ShardMap, rows_per_second: int, batch_size: int
    ) -> migrations.Migration:
        """Record a migration, refused (409) while another one is unfinished (the database's
        one-active index decides, so two at once cannot both start)."""
        async with self.connection() as con:
            return await migrations.create(con, kind, shard_id, target, current, rows_per_second, batch_size)

    async def active_migration(self) -> migrations.Migration | None:
        async with self.connection() as con:
            return await migrations.active(con)

    async def migration(self, migration_id: int) -> migrations.Migration:
        async with self.connection() as con:
            found = await migrations.get(con, migration_id)
        if found is None:
            raise errors.MigrationNotFound(f"no migration {migration_id}")
        return found

    async def recent_migrations(self) -> list[migrations.Migration]:
        async with self.connection() as con:
            return await migrations.recent(con)

    async def request_abort(self, migration_id: int) -> migrations.Migration:
        async with self.connection() as con:
            return await migrations.request_abort(con, migration_id)

    async def set_throttle(
        self, migration_id: int, rows_per_second: int | None, batch_size: int | None
    ) -> migrations.Migration:
        async with self.connection() as con:
            return await migrations.set_throttle(con, migration_id, rows_per_second, batch_size)

    async def range_counts(self, migration_id: int) -> tuple[int, int]:
        """(ranges in the migration, ranges copied)."""
        async with self.connection() as con:
            return await migrations.range_counts(con, migration_id)

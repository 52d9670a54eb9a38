"""All SQL on the shard database. asyncpg errors become the project's errors here only."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from dialogs import errors, pgmigrate

SHARD_MIGRATIONS = "dialog_api.migrations"

# The server-side errors that mean "this shard cannot serve now", as opposed to a bug.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    dialog_key: int
    from_user: uuid.UUID
    to_user: uuid.UUID
    text: str
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Stored:
    id: int
    created_at: Any
    duplicate: bool


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise errors.ShardUnavailable() from exc


_INSERT = """
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
        WITH ORDINALITY AS t(dialog_key, from_user, to_user, text, idempotency_key, ord)
), numbered AS MATERIALIZED (
    SELECT ord, dialog_key, from_user, to_user, text, idempotency_key,
           next_message_id(dialog_key) AS id, clock_timestamp() AS created_at
    FROM input ORDER BY ord
), inserted AS (
    INSERT INTO messages (dialog_key, id, from_user, to_user, text, created_at, idempotency_key)
    SELECT dialog_key, id, from_user, to_user, text, created_at, idempotency_key FROM numbered
    ON CONFLICT (dialog_key, from_user, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING dialog_key, id
)
SELECT n.ord, n.id, n.created_at, i.id IS NOT NULL AS inserted
FROM numbered n LEFT JOIN inserted i USING (dialog_key, id)
ORDER BY n.ord
"""

_EXISTING = """
SELECT m.dialog_key, m.from_user, m.idempotency_key, m.id, m.created_at, m.text, m.to_user
FROM messages m
JOIN unnest($1::bigint[], $2::uuid[], $3::text[]) AS k(dialog_key, from_user, idempotency_key)
  USING (dialog_key, from_user, idempotency_key)
"""

_LIST = """
SELECT id, from_user, to_user, text, created_at
FROM messages
WHERE dialog_key = $1
  AND ((from_user = $2 AND to_user = $3) OR (from_user = $3 AND to_user = $2))
  AND id < $4
ORDER BY id DESC
LIMIT $5
"""


class ShardStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_batch(self, batch: Sequence[NewMessage]) -> list[Stored | errors.DialogsError]:
        """Store a batch in one transaction (one commit, one WAL flush for all of them).

        Each result is the stored message, or the error for that send alone (a reused
        Idempotency-Key); the others in the batch are unaffected.
        """
        async with translated(), self.pool.acquire() as con, con.transaction():
            rows = await con.fetch(
                _INSERT,
                [m.dialog_key for m in batch],
                [m.from_user for m in batch],
                [m.to_user for m in batch],
                [m.text for m in batch],
                [m.idempotency_key for m in batch],
            )
            results: list[Stored | errors.DialogsError] = [
                Stored(row["id"], row["created_at"], duplicate=False) for row in rows
            ]
            repeated = [index for index, row in enumerate(rows) if not row["inserted"]]
            if repeated:
                await self._resolve_repeats(con, batch, repeated, results)
        return results

    async def _resolve_repeats(
        self,
        con: asyncpg.Connection,
        batch: Sequence[NewMessage],
        repeated: list[int],
        results: list[Stored | errors.DialogsError],
    ) -> None:
        keys = [batch[i] for i in repeated]
        existing = {
            (row["dialog_key"], row["from_user"], row["idempotency_key"]): row
            for row in await con.fetch(
                _EXISTING,
                [m.dialog_key for m in keys],
                [m.from_user for m in keys],
                [m.idempotency_key for m in keys],
            )
        }
        for index in repeated:
            message = batch[index]
            row = existing[(message.dialog_key, message.from_user, message.idempotency_key)]
            if row["text"] != message.text or row["to_user"] != message.to_user:
                results[index] = errors.IdempotencyKeyReused()
            else:
                results[index] = Stored(row["id"], row["created_at"], duplicate=True)

    async def list_messages(
        self, dialog_key: int, user_a: uuid.UUID, user_b: uuid.UUID, before: int, limit: int
    ) -> list[asyncpg.Record]:
        async with translated(), self.pool.acquire() as con:
            return await con.fetch(_LIST, dialog_key, user_a, user_b, before, limit)

    async def ping(self) -> None:
        async with translated(), self.pool.acquire() as con:
            await con.fetchval("SELECT 1")


async def migrate(dsn: str) -> list[str]:
    con = await asyncpg.connect(dsn)
    try:
        return await pgmigrate.apply(con, SHARD_MIGRATIONS)
    finally:
        await con.close()

"""The proxy's SQL on the metadata database: users. asyncpg errors are translated here."""

from __future__ import annotations

import contextlib
import datetime
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from dialogs import errors, pg


def translated() -> contextlib.AbstractAsyncContextManager[None]:
    """Metadata database failures as 503s (``dialogs.pg``)."""
    return pg.translated(errors.MetadataUnavailable)


@dataclass(frozen=True, slots=True)
class NewUser:
    first_name: str
    second_name: str
    birthdate: datetime.date | None
    biography: str
    city: str
    password: str


_USER_COLUMNS = "id, first_name, second_name, birthdate, biography, city"


def user_json(row: asyncpg.Record) -> dict[str, Any]:
    """A user as the spec types it: a birthdate never given is left out, never null
    (``User.birthdate`` is a non-nullable date; generated clients reject null)."""
    user = {
        "id": str(row["id"]),
        "first_name": row["first_name"],
        "second_name": row["second_name"],
        "biography": row["biography"],
        "city": row["city"],
    }
    if row["birthdate"] is not None:
        user["birthdate"] = row["birthdate"].isoformat()
    return user


def _like_prefix(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class UserStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, user: NewUser, password_hash: str) -> uuid.UUID:
        user_id = uuid.uuid4()
        async with translated(), self.pool.acquire() as con:
            await con.execute(
                "INSERT INTO users (id, first_name, second_name, birthdate, biography, city, password_hash)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                user_id,
                user.first_name,
                user.second_name,
                user.birthdate,
                user.biography,
                user.city,
                password_hash,
            )
        return user_id

    async def password_hash(self, user_id: uuid.UUID) -> str | None:
        async with translated(), self.pool.acquire() as con:
            return await con.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)

    async def get(self, user_id: uuid.UUID) -> asyncpg.Record | None:
        async with translated(), self.pool.acquire() as con:
            return await con.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)

    async def exists(self, user_id: uuid.UUID) -> bool:
        async with translated(), self.pool.acquire() as con:
            return bool(await con.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id))

    async def search(self, first_name: str, second_name: str, limit: int) -> list[asyncpg.Record]:
        async with translated(), self.pool.acquire() as con:
            return await con.fetch(
                f"SELECT {_USER_COLUMNS} FROM users"
                " WHERE first_name LIKE $1 AND second_name LIKE $2 ORDER BY id LIMIT $3",
                _like_prefix(first_name),
                _like_prefix(second_name),
                limit,
            )

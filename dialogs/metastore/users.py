"""Users in the metadata database: the SQL, on a connection the caller holds
(``dialogs/metastore/store.py`` holds the pool and translates failures)."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class NewUser:
    first_name: str
    second_name: str
    birthdate: datetime.date | None
    biography: str
    city: str
    password: str


_USER_COLUMNS = "id, first_name, second_name, birthdate, biography, city"


def _like_prefix(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def create(con: asyncpg.Connection, user: NewUser, password_hash: str) -> uuid.UUID:
    user_id = uuid.uuid4()
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


async def password_hash(con: asyncpg.Connection, user_id: uuid.UUID) -> str | None:
    value: str | None = await con.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
    return value


async def get(con: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    return await con.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)


async def exists(con: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    return bool(await con.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id))


async def search(con: asyncpg.Connection, first_name: str, second_name: str, limit: int) -> list[asyncpg.Record]:
    return list(
        await con.fetch(
            f"SELECT {_USER_COLUMNS} FROM users WHERE first_name LIKE $1 AND second_name LIKE $2 ORDER BY id LIMIT $3",
            _like_prefix(first_name),
            _like_prefix(second_name),
            limit,
        )
    )

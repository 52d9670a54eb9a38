"""PostgreSQL failures, mapped once (as httpx maps its transport errors in one place).

Two sets, for two kinds of caller:

- ``UNAVAILABLE``: the database cannot serve right now: unreachable, restarting, shutting
  down, a connection lost mid-query, a query cancelled by its timeout. Request paths
  turn these into 503s (``translated``); anything else from the database is a bug and
  stays a 500.
- ``FAILURES``: ``UNAVAILABLE`` plus any error the server reports. Background loops
  (watchers, heartbeats, the migration runner) log these and retry.

asyncpg raises ``InternalClientError`` when a connection breaks in the middle of its
protocol exchange (seen when a PostgreSQL server is killed under load); it is not an
``InterfaceError``, so it is named here explicitly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from dialogs import errors

UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
)

FAILURES: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


@contextlib.asynccontextmanager
async def translated(unavailable: type[errors.Unavailable]) -> AsyncIterator[None]:
    """Raise ``unavailable`` (a 503) for any error of ``UNAVAILABLE`` inside the block."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise unavailable() from exc

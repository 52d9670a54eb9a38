"""PostgreSQL failures, mapped once (as httpx maps its transport errors in one place).

Two sets, for two kinds of caller:

- ``UNAVAILABLE``: the database cannot serve right now: unreachable, restarting, shutting
  down, out of a resource (SQLSTATE class 53: no connection slot left, disk full, out of
  memory), a connection lost mid-query, a query cancelled by its timeout. Request paths
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
import urllib.parse
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
    asyncpg.InsufficientResourcesError,  # class 53: "too many clients", disk full, out of memory
)

FAILURES: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


@contextlib.asynccontextmanager
async def translated(unavailable: type[errors.Unavailable]) -> AsyncIterator[None]:
    """Raise ``unavailable`` (a 503) for any error of ``UNAVAILABLE`` inside the block."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise unavailable() from exc


_ENCODE_HINT = "URL-encode special characters in the user name and password (@ %40, : %3A, / %2F, # %23, ? %3F, % %25)"


def dsn_problem(value: object) -> str | None:
    """What is wrong with a PostgreSQL URL, in words that never repeat its password; None if fine.

    The common mistake is a password with URL-special characters pasted as it is: the URL
    then parses as another host, port or path, and the driver fails with a traceback.
    Several hosts (``h1:5432,h2:5433``), IPv6 hosts (``[::1]``) and a socket directory in
    the query (``?host=/run/postgresql``) are fine.
    """
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        return "must be a postgresql:// URL"
    if "#" in value:
        return f"is not a valid postgresql:// URL: it holds a '#'; {_ENCODE_HINT}"
    netloc = urllib.parse.urlsplit(value).netloc
    if netloc.count("@") > 1:
        return f"is not a valid postgresql:// URL: more than one '@' before the host; {_ENCODE_HINT}"
    path = urllib.parse.urlsplit(value).path
    if "@" in path or path.count("/") > 1:
        return f"is not a valid postgresql:// URL: its database name holds '@' or '/'; {_ENCODE_HINT}"
    for host in netloc.rpartition("@")[2].split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, digits = port.rpartition(":")
        if colon and not (digits.isdigit() and 1 <= int(digits) <= 65535):
            return f"is not a valid postgresql:// URL: a port is not a number from 1 to 65535; {_ENCODE_HINT}"
    return None

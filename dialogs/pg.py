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

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from dialogs import errors


class NotThePrimary(Exception):
    """A server of a replicated group that may not serve as its primary now (``PRIMARY_CHECK``):
    for a caller, the database is unavailable, as when it is down."""


UNAVAILABLE: tuple[type[BaseException], ...] = (
    NotThePrimary,
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


# --- connecting to whichever server of a replicated group is the primary ---------------------

# Whether a server may serve as its group's primary: not a standby, and, when it waits for a
# synchronous standby, one is connected. A primary frozen through a failover (SIGSTOP, a VM
# paused) wakes up read-write until its Patroni demotes it, with its synchronous standby gone
# (promoted): it fails this, so nothing is read from it (its writes could never commit:
# they wait for that standby). A primary whose standby died fails it only until Patroni stops
# waiting for the standby. (CASE: pg_stat_replication is read only when it matters.)
PRIMARY_CHECK = """
NOT pg_is_in_recovery() AND CASE WHEN current_setting('synchronous_standby_names') = '' THEN true
    ELSE EXISTS (SELECT 1 FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')) END
"""


def hosts_of(dsn: str) -> list[str]:
    """The ``host:port`` entries of a DSN (one for a single server, several for a group)."""
    netloc = urllib.parse.urlsplit(dsn).netloc.rpartition("@")[2]
    return [host for host in netloc.split(",") if host]


def _with_host(dsn: str, host: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    credentials, at, _ = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}{at}{host}"))


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, but a DSN naming several servers (a replicated group, with
    ``target_session_attrs=read-write``) is tried on all of them at once, and the first
    that accepts wins. asyncpg would try them in turn within one timeout, so a primary
    whose host is frozen (connections accepted by the kernel, never answered) would use up
    the whole timeout before its successor was tried. Also the pools' ``connect``."""
    hosts = hosts_of(dsn)
    if len(hosts) <= 1:
        return await asyncpg.connect(dsn, **kwargs)

    async def primary_at(host: str) -> asyncpg.Connection:
        con = await asyncpg.connect(_with_host(dsn, host), **kwargs)
        try:
            if await con.fetchval(f"SELECT {PRIMARY_CHECK}"):
                return con
        except BaseException:
            con.terminate()
            raise
        con.terminate()
        raise NotThePrimary(f"{host} may not serve as the primary now")

    attempts = [asyncio.ensure_future(primary_at(host)) for host in hosts]
    chosen: asyncpg.Connection | None = None
    failure: BaseException | None = None
    try:
        for finished in asyncio.as_completed(attempts):
            try:
                chosen = await finished
                return chosen
            except (*FAILURES, asyncpg.TargetServerAttributeNotMatched) as exc:
                failure = exc
        assert failure is not None
        raise failure
    finally:
        for attempt in attempts:
            if not attempt.done():
                attempt.cancel()
            elif not attempt.cancelled() and attempt.exception() is None and attempt.result() is not chosen:
                attempt.result().terminate()
        try:
            await asyncio.gather(*attempts, return_exceptions=True)
        except BaseException:  # cancelled while the others wind down: the caller never gets it
            if chosen is not None:
                chosen.terminate()
            raise


@contextlib.asynccontextmanager
async def pooled(pool: asyncpg.Pool, timeout: float | None) -> AsyncIterator[asyncpg.Connection]:
    """A connection of ``pool`` (waiting at most ``timeout`` for one). One whose statement
    failed or was cut short (a deadline, a server lost, frozen or demoted) is closed, not
    handed back: asyncpg would wait, unbounded, for the server to confirm the cancellation
    before reusing it, and a demoted primary must get no more statements."""
    con = await pool.acquire(timeout=timeout)
    try:
        yield con
    except BaseException:
        con.terminate()
        raise
    finally:
        await pool.release(con)


def create_pool(dsn: str, **kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` whose new connections go to the primary (``connect``)."""

    async def connect_one(dsn: str, **options: Any) -> asyncpg.Connection:
        return await connect(dsn, **options)

    return asyncpg.create_pool(dsn, connect=connect_one, **kwargs)

"""Registration in the metadata database: a heartbeat loop, and leaving on shutdown.

Workers register so proxies can route to them; proxies register so a migration's
cleanup can wait until every live process has acknowledged the new shard map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from dialogs import pg
from dialogs.aio import background
from dialogs.metastore import members

log = logging.getLogger(__name__)

Statement = Callable[[asyncpg.Connection], Awaitable[None]]


async def heartbeat_forever(pool: asyncpg.Pool, beat: Statement, interval: float, who: str) -> None:
    """Run ``beat`` every ``interval`` seconds until cancelled; failures are logged and retried."""
    registered = waiting = False
    while True:
        try:
            async with pool.acquire(timeout=interval) as con:
                await beat(con)
            if not registered:
                log.info("registered %s", who)
                registered = True
        except members.ShardNotRegistered as exc:
            if not waiting:  # expected while `shard add` starts a worker before it registers the shard
                log.info("%s: %s", who, exc)
                waiting = True
        except pg.FAILURES as exc:
            log.warning("heartbeat of %s failed: %s", who, exc)
        await asyncio.sleep(interval)


async def leave(pool: asyncpg.Pool, statement: Statement, who: str) -> None:
    try:
        async with pool.acquire(timeout=1.0) as con:
            await statement(con)
    except pg.FAILURES as exc:
        log.warning("could not deregister %s: %s", who, exc)


@contextlib.asynccontextmanager
async def registered(
    dsn: str, beat: Statement, leave_statement: Statement, interval: float, who: str
) -> AsyncIterator[None]:
    """Heartbeat with ``beat`` for the duration of the block (own small pool), then ``leave_statement``."""
    async with pg.create_pool(dsn, min_size=0, max_size=1) as pool:
        async with background(heartbeat_forever(pool, beat, interval, who)):
            yield
        await leave(pool, leave_statement, who)

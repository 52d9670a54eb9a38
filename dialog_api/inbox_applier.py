"""The inbox applier: one per shard (docs/inbox.md, "Keeping the projection right").

Every worker of a shard runs one; the one holding the shard's applier lock (a session
advisory lock on its own connection) works, the others wait for the lock. The worker that
holds it reads the oldest announced dialogs from the shard's outbox with their snapshots,
applies each user's row on the shard that owns the user's key (by this worker's map), and
deletes the outbox rows whose every row was applied. What could not be applied (an owner's
range in a cutover, a shard unreachable, a map that moved on) stays in the outbox and is
tried again: a crash anywhere delays the inbox, never loses or doubles a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg

from dialog_api.map_view import MapView
from dialog_api.metrics import WorkerMetrics
from dialogs import inbox, pg

log = logging.getLogger(__name__)


class _NoDatabase(Exception):
    """A shard of the map whose database this worker has not loaded from the metadata yet."""


_BACKLOG = "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM inbox_outbox"


class InboxApplier:
    def __init__(
        self,
        shard_dsn: str,
        view: MapView,
        metrics: WorkerMetrics,
        batch: int,
        poll_interval: float,
        query_timeout: float,
    ) -> None:
        self._shard_dsn = shard_dsn
        self._view = view
        self._metrics = metrics
        self._batch = batch
        self._poll_interval = poll_interval
        self._query_timeout = query_timeout
        self._pools: dict[str, tuple[str, asyncpg.Pool]] = {}
        self._gauges_at = 0.0
        self.leading = False

    async def run(self) -> None:
        """Take the lock, apply while it is held; on any failure start over. Until cancelled."""
        backoff = self._poll_interval
        try:
            while True:
                try:
                    async with self._lease() as con:
                        if con is None:
                            await asyncio.sleep(1.0)  # another worker of the shard applies
                            continue
                        backoff = self._poll_interval
                        await self._apply_while_leading(con)
                except pg.FAILURES as exc:
                    log.warning("inbox applier: %s; retrying", exc or type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            for _, pool in self._pools.values():
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[asyncpg.Connection | None]:
        con = await pg.connect(self._shard_dsn, timeout=self._query_timeout, command_timeout=self._query_timeout)
        try:
            if not await con.fetchval("SELECT pg_try_advisory_lock($1)", inbox.APPLIER_LOCK):
                yield None
                return
            self.leading = True
            log.info("inbox applier: this worker applies its shard's outbox")
            yield con
        finally:
            self.leading = False
            self._metrics.inbox_backlog.set(0)
            self._metrics.inbox_lag.set(0)
            con.terminate()  # the lock goes with the session

    async def _apply_while_leading(self, con: asyncpg.Connection) -> None:
        while True:
            await self._refresh_gauges(con)
            applied, complete = await self.apply_once(con)
            if not applied or not complete:
                # Idle, or something must wait (a cutover, a shard unreachable): poll.
                await asyncio.sleep(self._poll_interval)

    async def apply_once(self, con: asyncpg.Connection) -> tuple[int, bool]:
        """One batch: (outbox rows applied and deleted, whether every announced dialog was)."""
        shard_map = self._view.map
        if shard_map is None:
            return 0, False
        snapshots = await con.fetch(inbox.SNAPSHOTS_FROM_OUTBOX, self._batch)
        if not snapshots:
            return 0, True
        by_shard: dict[str, list[inbox.InboxRow]] = {}
        rows_of: list[tuple[list[int], list[tuple[str, inbox.RowKey]]]] = []
        for snapshot in snapshots:
            placed = []
            for row in inbox.project(snapshot):
                shard_id = shard_map.owner(row.user_key)
                by_shard.setdefault(shard_id, []).append(row)
                placed.append((shard_id, (row.user_key, row.owner, row.peer)))
            rows_of.append((snapshot["seqs"], placed))
        shard_ids = sorted(by_shard)
        answers = await asyncio.gather(*(self._apply_on(s, by_shard[s]) for s in shard_ids), return_exceptions=True)
        statuses: dict[str, dict[inbox.RowKey, str]] = {}
        for shard_id, answer in zip(shard_ids, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, (*pg.FAILURES, _NoDatabase)):
                    raise answer
                log.warning("inbox applier: cannot apply on %s yet: %s", shard_id, answer or type(answer).__name__)
                statuses[shard_id] = {}
            else:
                statuses[shard_id] = answer
        done = [
            seq
            for seqs, placed in rows_of
            if all(statuses[shard_id].get(key) == "applied" for shard_id, key in placed)
            for seq in seqs
        ]
        if done:
            await con.execute("DELETE FROM inbox_outbox WHERE seq = ANY($1::bigint[])", done)
            self._metrics.inbox_applied.inc(len(done))
        refused = any(status == "not_served" for answer in statuses.values() for status in answer.values())
        if refused and self._view.watcher is not None:
            # A newer map routes those users elsewhere: load it before the next try.
            await self._view.watcher.refresh(timeout=self._query_timeout)
        return len(done), len(done) == sum(len(seqs) for seqs, _ in rows_of)

    async def _apply_on(self, shard_id: str, rows: list[inbox.InboxRow]) -> dict[inbox.RowKey, str]:
        pool = await self._pool(shard_id)
        async with pg.pooled(pool, self._query_timeout) as con:
            return await inbox.apply(con, rows)

    async def _pool(self, shard_id: str) -> asyncpg.Pool:
        """A small pool to a shard, by the DSN registered for it (a new one if it changed)."""
        dsn = self._view.dsns.get(shard_id)
        if dsn is None:
            raise _NoDatabase(f"no database registered for shard {shard_id} yet")
        known = self._pools.get(shard_id)
        if known is not None and known[0] == dsn:
            return known[1]
        if known is not None:
            known[1].terminate()
        pool = pg.create_pool(dsn, min_size=0, max_size=2, command_timeout=self._query_timeout)
        await pool
        self._pools[shard_id] = (dsn, pool)
        return pool

    async def _refresh_gauges(self, con: asyncpg.Connection) -> None:
        """Backlog and lag of this shard's outbox, at most once a second (a count costs)."""
        now = time.monotonic()
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        rows, lag = await con.fetchrow(_BACKLOG)
        self._metrics.inbox_backlog.set(rows)
        self._metrics.inbox_lag.set(lag)

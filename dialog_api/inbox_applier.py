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
import logging
import time

import asyncpg

from dialog_api.map_view import MapView
from dialog_api.metrics import WorkerMetrics
from dialogs import inbox, pg

log = logging.getLogger(__name__)


class _NoDatabase(Exception):
    """A shard of the map whose database this worker has not loaded from the metadata yet."""


# Backlog as the span of seqs left (an upper bound on the rows: read off the primary key,
# where count(*) would scan a long outbox every second) and lag as the age of the oldest row.
_BACKLOG = """
SELECT coalesce(max(seq) - min(seq) + 1, 0) AS rows,
       coalesce(extract(epoch FROM now() - (SELECT created_at FROM inbox_outbox ORDER BY seq LIMIT 1)), 0)::float8
FROM inbox_outbox
"""
_RETRIED: tuple[type[BaseException], ...] = (*pg.FAILURES, _NoDatabase)
SHARD_DOWN_PAUSE = 2.0  # seconds a user's shard that failed is not tried again


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
        self._after = 0  # the outbox is read in seq order past this, then again from the start
        self._down_until: dict[str, float] = {}  # user shards that failed, not tried until then
        self.leading = False

    async def run(self) -> None:
        """Keep a connection to the shard, try for the lock every second, apply while it is
        held; on any failure start over. Until cancelled."""
        backoff = self._poll_interval
        try:
            while True:
                try:
                    con = await self._connect()
                    try:
                        while not await con.fetchval(inbox.TAKE_APPLIER_LOCK, inbox.APPLIER_LOCK_CLASS):
                            await self._refresh_gauges(con)  # every worker shows its shard's lag
                            await asyncio.sleep(1.0)  # another worker of the shard applies
                        backoff = self._poll_interval
                        self.leading = True
                        log.info("inbox applier: this worker applies its shard's outbox")
                        await self._apply_while_leading(con)
                    finally:
                        self.leading = False
                        con.terminate()  # the lock goes with the session
                except _RETRIED as exc:
                    log.warning("inbox applier: %s; retrying", exc or type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            for _, pool in self._pools.values():
                pool.terminate()

    async def _connect(self) -> asyncpg.Connection:
        """The lock's connection. The server ends it when it idles past a few query timeouts
        (its worker frozen, or cut off), so a stuck applier's turn passes to another worker."""
        idle_ms = int(max(10.0, 3 * self._query_timeout) * 1000)
        return await pg.connect(
            self._shard_dsn,
            timeout=self._query_timeout,
            command_timeout=self._query_timeout,
            server_settings={"idle_session_timeout": str(idle_ms), **self._bounded()},
        )

    def _bounded(self) -> dict[str, str]:
        """A statement given up on here (its timeout) ends on the server too, also while it
        waits for a lock: it must not go on holding or queueing for an owner's total row."""
        return {
            "statement_timeout": str(int(self._query_timeout * 1000)),
            "client_connection_check_interval": "250ms",
        }

    async def _apply_while_leading(self, con: asyncpg.Connection) -> None:
        """Passes over the outbox. A pass reads batches past the cursor while they come full
        (a backlog) and ends at the first lighter one; the next pass starts from the first
        row after the poll interval, so that under a steady load a batch gathers a poll
        interval's changes (fewer, larger transactions on every shard, and a dialog changed
        twice meanwhile is read once) instead of chasing each commit. After a pass where
        everything had to wait (a cutover, a shard unreachable), longer each time, up to a
        second.

        While rows wait for a user shard that is down, a pass that began at the first row
        would read them all again, more of them the longer it is down. So meanwhile a pass
        begins where the pass before the last one ended: it reads the rows that came since,
        and the last pass's once more (a row that committed late under a lower seq than
        that is read by the next full pass). A full pass comes once the first pause of a
        waiting shard since the last full pass is over (the shard tried again), and no
        sooner after the last full pass than that one took."""
        idle = self._poll_interval
        applied = read = 0
        self._after = 0  # a new turn (this worker's first, or after losing the lock) begins with a full pass
        full, began = True, time.monotonic()  # whether this pass began at the first row, and when
        # Shards, down, that rows waited for since the last full pass, and when their first
        # pause since then ends (a shard failing again meanwhile does not put it off).
        waiting_on: dict[str, float] = {}
        full_pass_due = 0.0
        previous_end = 0  # where the pass before this one ended
        while True:
            await self._refresh_gauges(con)
            batch_applied, batch_read, batch_waiting = await self.apply_once(con)
            applied, read = applied + batch_applied, read + batch_read
            for shard_id in batch_waiting:
                waiting_on.setdefault(shard_id, self._down_until.get(shard_id, 0.0))
            if batch_read >= self._batch:
                continue  # a backlog: the pass goes on past this batch
            # The pass reached the end of the outbox.
            now = time.monotonic()
            if full:
                full_pass_due = now + (now - began)
            end = max(self._after, previous_end)
            if waiting_on and (now < full_pass_due or now < min(waiting_on.values())):
                self._after, previous_end, full = previous_end, end, False
            else:
                self._after, previous_end, full, waiting_on = 0, end, True, {}
            if read and not applied:
                idle = min(idle * 2, 1.0)
            else:
                idle = self._poll_interval
            await asyncio.sleep(idle)
            applied = read = 0
            began = time.monotonic()

    async def apply_once(self, con: asyncpg.Connection) -> tuple[int, int, set[str]]:
        """One batch past the cursor: (outbox rows applied and deleted, outbox rows read,
        the user shards, down, that some of them waited for).

        What must wait stays in the outbox, and the next batch reads past it, so one
        unreachable shard or frozen range holds back its own users' rows only; where the
        next pass begins is ``_apply_while_leading``'s to say."""
        shard_map = self._view.map
        if shard_map is None:
            return 0, 0, set()
        snapshots = await con.fetch(inbox.SNAPSHOTS_FROM_OUTBOX, self._after, self._batch)
        if not snapshots:
            return 0, 0, set()
        read = sum(len(snapshot["seqs"]) for snapshot in snapshots)
        self._metrics.inbox_read.inc(read)
        self._after = max(max(snapshot["seqs"]) for snapshot in snapshots)
        by_shard: dict[str, list[inbox.InboxRow]] = {}
        rows_of: list[tuple[list[int], list[tuple[str, inbox.RowKey]]] | None] = []
        for snapshot in snapshots:
            if not snapshot["served"]:
                rows_of.append(None)  # moved away: the migration's cleanup hands it on
                continue
            placed = []
            for row in inbox.project(snapshot):
                shard_id = shard_map.owner(row.user_key)
                by_shard.setdefault(shard_id, []).append(row)
                placed.append((shard_id, (row.user_key, row.owner, row.peer)))
            rows_of.append((snapshot["seqs"], placed))
        shard_ids = sorted(by_shard)
        answers = await asyncio.gather(*(self._apply_on(s, by_shard[s]) for s in shard_ids), return_exceptions=True)
        statuses: dict[str, dict[inbox.RowKey, str]] = {}
        waiting_on: set[str] = set()
        for shard_id, answer in zip(shard_ids, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, _RETRIED):
                    raise answer
                log.warning("inbox applier: cannot apply on %s yet: %s", shard_id, answer or type(answer).__name__)
                self._down_until[shard_id] = time.monotonic() + SHARD_DOWN_PAUSE
                answer = None
            if answer is None:  # down: failed now, or a moment ago
                waiting_on.add(shard_id)
                statuses[shard_id] = {}
            else:
                statuses[shard_id] = answer
        done = [
            seq
            for entry in rows_of
            if entry is not None and all(statuses[shard_id].get(key) == "applied" for shard_id, key in entry[1])
            for seq in entry[0]
        ]
        if done:
            await con.execute("DELETE FROM inbox_outbox WHERE seq = ANY($1::bigint[])", done)
            self._metrics.inbox_applied.inc(len(done))
        refused = any(status == "not_served" for answer in statuses.values() for status in answer.values())
        if refused and self._view.watcher is not None:
            # A newer map routes those users elsewhere: load it before the next try.
            await self._view.watcher.refresh(timeout=self._query_timeout)
        return len(done), read, waiting_on

    async def _apply_on(self, shard_id: str, rows: list[inbox.InboxRow]) -> dict[inbox.RowKey, str] | None:
        """Each row's status, or None for a shard that failed a moment ago (not tried yet)."""
        if self._down_until.get(shard_id, 0.0) > time.monotonic():
            return None  # its rows wait, the others' go on
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
        pool = pg.create_pool(
            dsn, min_size=0, max_size=2, command_timeout=self._query_timeout, server_settings=self._bounded()
        )
        await pool
        self._pools[shard_id] = (dsn, pool)
        return pool

    async def _refresh_gauges(self, con: asyncpg.Connection) -> None:
        """Backlog and lag of this shard's outbox, at most once a second."""
        now = time.monotonic()
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        rows, lag = await con.fetchrow(_BACKLOG)
        self._metrics.inbox_backlog.set(rows)
        self._metrics.inbox_lag.set(lag)

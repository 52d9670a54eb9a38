"""Group commit: sends that arrive while a commit is in flight share the next transaction.

There is no timer: an idle worker commits a lone send at once. Under load, each of the
``flushers`` takes whatever queued up while it was committing (up to ``batch_max``), so one
WAL flush acknowledges many sends and throughput grows with concurrency.

Writes can be paused (``pause``) for a planned switchover of the shard's primary: the
commits in flight finish, and until ``resume`` (or the pause's lease runs out) every send
is answered ``ShardUnavailable`` without touching the database, so nothing is committing
when the primary stops and the proxies hold the sends and retry them (as during a
failover) on the new primary. A send that was never sent to the database is safe to send
again, with an Idempotency-Key or without.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable

from dialog_api.storage import NewMessage, ShardStore, Stored
from dialogs import errors
from dialogs.wire import MAX_WRITE_PAUSE_SECONDS as MAX_PAUSE_SECONDS

log = logging.getLogger(__name__)

PAUSED = "writes to this shard are paused for a switchover of its primary; retry shortly"


class GroupCommit:
    def __init__(
        self,
        store: ShardStore,
        batch_max: int,
        flushers: int,
        observe: Callable[[int, float], None] = lambda size, seconds: None,
    ) -> None:
        self._store = store
        self._batch_max = batch_max
        self._flushers = flushers
        self._observe = observe
        self._pending: collections.deque[tuple[NewMessage, asyncio.Future[Stored]]] = collections.deque()
        self._wake = asyncio.Event()
        self._pauses: dict[str, float] = {}  # holder -> time.monotonic() its pause ends
        # Holders whose pause ended, for as long as a pause may last: a renewal of theirs
        # that arrives after the resume (its sender gave up on it, the request went on) is
        # ignored rather than pausing writes again.
        self._ended: dict[str, float] = {}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def paused(self) -> bool:
        if not self._pauses:
            return False
        now = time.monotonic()
        return any(until > now for until in self._pauses.values())

    async def pause(self, holder: str, seconds: float, drain_timeout: float) -> bool:
        """Pause writes for ``holder`` until ``seconds`` after the commits in flight are done
        (a renewal by the same holder moves its end); True once none is in flight, False
        if one still was after ``drain_timeout`` (the pause stands: the holder decides).
        A holder already resumed is not paused again (False)."""
        self._prune()
        if holder in self._ended:
            return False
        self._pauses[holder] = math.inf  # held however long the drain takes
        self._wake.set()  # sends already queued are answered now, not at the next arrival
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if holder in self._pauses:  # not resumed meanwhile: counted from the drain, not the request
                self._pauses[holder] = time.monotonic() + seconds

    def resume(self, holder: str) -> None:
        """End ``holder``'s pause; another holder's (a concurrent switchover) stands."""
        self._pauses.pop(holder, None)
        self._ended[holder] = time.monotonic() + MAX_PAUSE_SECONDS + 60
        self._prune()

    def _prune(self) -> None:
        now = time.monotonic()
        self._pauses = {holder: until for holder, until in self._pauses.items() if until > now}
        self._ended = {holder: until for holder, until in self._ended.items() if until > now}

    def submit_many(self, messages: list[NewMessage]) -> list[asyncio.Future[Stored]]:
        """Queue ``messages`` together; each future gets its own outcome."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Stored]] = []
        for message in messages:
            future: asyncio.Future[Stored] = loop.create_future()
            self._pending.append((message, future))
            futures.append(future)
        if futures:
            self._wake.set()
        return futures

    async def run(self) -> None:
        """Run the flushers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self._flushers):
                group.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            batch = self._take()
            if not self._pending:
                self._wake.clear()
            if not batch:
                continue
            if self.paused:
                _refuse(batch, errors.ShardUnavailable(PAUSED))
                continue
            self._in_flight += 1
            self._idle.clear()
            try:
                await self._flush(batch)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

    def _take(self) -> list[tuple[NewMessage, asyncio.Future[Stored]]]:
        batch: list[tuple[NewMessage, asyncio.Future[Stored]]] = []
        while self._pending and len(batch) < self._batch_max:
            message, future = self._pending.popleft()
            if not future.cancelled():
                batch.append((message, future))
        return batch

    async def _flush(self, batch: list[tuple[NewMessage, asyncio.Future[Stored]]]) -> None:
        started = time.perf_counter()
        try:
            results = await self._store.insert_batch([message for message, _ in batch])
            self._observe(len(batch), time.perf_counter() - started)
        except errors.DialogsError as exc:
            _refuse(batch, exc)
            return
        except Exception:
            log.exception("group commit failed")
            _refuse(batch, errors.DialogsError())
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the client went away; the message is stored all the same
            if isinstance(result, errors.DialogsError):
                future.set_exception(result)
            else:
                future.set_result(result)


def _refuse(batch: list[tuple[NewMessage, asyncio.Future[Stored]]], error: errors.DialogsError) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)

"""Group commit: sends that arrive while a commit is in flight share the next transaction.

There is no timer: an idle worker commits a lone send at once. Under load, each of the
``flushers`` takes whatever queued up while it was committing (up to ``batch_max``), so one
WAL flush acknowledges many sends and throughput grows with concurrency.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from dialog_api.storage import NewMessage, ShardStore, Stored
from dialogs import errors

log = logging.getLogger(__name__)


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
            if batch:
                await self._flush(batch)

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
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception:
            log.exception("group commit failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(errors.DialogsError())
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the client went away; the message is stored all the same
            if isinstance(result, errors.DialogsError):
                future.set_exception(result)
            else:
                future.set_result(result)

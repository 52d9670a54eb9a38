"""Follow the metadata database: LISTEN for changes, poll as a fallback, survive outages.

One dedicated connection (a pooled one would drop its listeners). ``load`` is called
with that connection at start, on every notification and every ``poll_interval``; the
caller keeps whatever state ``load`` builds. When the database is unreachable, ``load``
is simply not called: the caller keeps serving its last good view, and the watcher keeps
reconnecting with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from dialogs import pg

log = logging.getLogger(__name__)

Loader = Callable[[asyncpg.Connection], Awaitable[None]]


class MetadataWatcher:
    def __init__(
        self,
        dsn: str,
        channels: Sequence[str],
        load: Loader,
        poll_interval: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self._channels = tuple(channels)
        self._load = load
        self._poll_interval = poll_interval
        self._connect_timeout = connect_timeout
        self._wakeup = asyncio.Event()
        self._loaded = asyncio.Event()
        self._started = 0  # loads begun
        self._finished = 0  # the last load that completed (by its begin number)
        self._progress = asyncio.Event()  # pulsed after every load or failure
        self.connected = False

    async def run(self) -> None:
        """Keep a connection, load on notify and on every poll; runs until cancelled."""
        backoff = 0.1
        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await pg.connect(self._dsn, timeout=self._connect_timeout)
                for channel in self._channels:
                    await con.add_listener(channel, self._notified)
                while True:
                    await self._load_once(con)
                    # Up only once a load worked: a loader that keeps failing is not "up",
                    # and its retries back off instead of reconnecting ten times a second.
                    self.connected = True
                    backoff = 0.1
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
                    except TimeoutError:
                        pass
            except Exception as exc:  # noqa: BLE001 - a watcher that dies leaves a stale view for good
                if isinstance(exc, pg.FAILURES):
                    if self.connected:
                        log.warning("metadata database unreachable, keeping the last view: %s", exc)
                else:
                    log.exception("loading from the metadata database failed; keeping the last view, retrying")
                self.connected = False
                self._pulse()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if con is not None:
                    con.terminate()

    async def refresh(self, timeout: float = 2.0) -> bool:
        """Ask for a load that begins after this call and wait for it to finish.

        False if the database is unreachable or the load did not finish within ``timeout``.
        Concurrent callers share one load: a burst of stale-map retries costs one query.
        """
        target = self._started + 1
        self._wakeup.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._finished < target:
            progress = self._progress
            try:
                await asyncio.wait_for(progress.wait(), deadline - loop.time())
            except TimeoutError:
                return False
            if not self.connected:
                return False
        return True

    async def wait_loaded(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _load_once(self, con: asyncpg.Connection) -> None:
        self._wakeup.clear()
        self._started += 1
        begun = self._started
        await self._load(con)
        self._finished = begun
        self._loaded.set()
        self._pulse()

    def _pulse(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    def _notified(self, *_: object) -> None:
        self._wakeup.set()

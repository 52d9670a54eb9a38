"""Runs migrations inside a proxy: whichever proxy gets the lease drives the active one.

A new migration, or one whose runner died (its lease went with its connection), is
picked up on the next notification or poll, within about a second.

The runner gets an event loop of its own, on a thread of its own. Under load the proxy's
loop has hundreds of request callbacks ready at any moment; a cutover step queued behind
them waits tens of milliseconds per round trip, and every one of those milliseconds is a
write pause. On its own loop the runner waits at most for the GIL's switch interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import asyncpg

from dialogs.aio import background
from dialogs.metastore import migrations
from dialogs.watch import MetadataWatcher
from proxy.migration.runner import RunnerSettings, run_active

log = logging.getLogger(__name__)

MIGRATION_CHANNEL = "dialogs_migration"


class MigrationDriver:
    def __init__(self, metadata_dsn: str, settings: RunnerSettings, poll_interval: float = 1.0) -> None:
        self._dsn = metadata_dsn
        self._settings = settings
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()

    async def _load(self, con: asyncpg.Connection) -> None:
        if await migrations.active(con) is not None:
            self._wake.set()

    async def run(self) -> None:
        watcher = MetadataWatcher(self._dsn, [MIGRATION_CHANNEL], self._load, self._poll_interval)
        async with background(watcher.run()):
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    await self._run_on_own_loop()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("migration runner failed; retrying")
                    await asyncio.sleep(self._poll_interval)

    async def _run_on_own_loop(self) -> None:
        """run_active() on a fresh loop in a thread; cancelling this cancels the runner there."""
        loop = asyncio.new_event_loop()
        runner = loop.create_task(run_active(self._dsn, self._settings))
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                loop.run_until_complete(runner)
            except BaseException as exc:  # reported to the driver's loop below
                failure.append(exc)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=drive, name="migration-runner", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            # The proxy is stopping: stop the runner too, and always let the cancellation
            # through (swallowing it would keep this driver, and the proxy's shutdown, alive).
            try:
                loop.call_soon_threadsafe(runner.cancel)
            except RuntimeError:
                pass  # the runner finished and closed its loop meanwhile
            await asyncio.shield(asyncio.to_thread(thread.join, 10))
            raise
        if failure and not isinstance(failure[0], asyncio.CancelledError):
            raise failure[0]

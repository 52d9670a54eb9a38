"""Runs migrations inside a proxy: whichever proxy gets the lease drives the active one.

A new migration, or one whose runner died (its lease went with its connection), is
picked up on the next notification or poll, within about a second.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from dialogs.aio import background
from dialogs.watch import MetadataWatcher
from proxy.migration import store
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
        if await store.active(con) is not None:
            self._wake.set()

    async def run(self) -> None:
        watcher = MetadataWatcher(self._dsn, [MIGRATION_CHANNEL], self._load, self._poll_interval)
        async with background(watcher.run()):
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    await run_active(self._dsn, self._settings)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("migration runner failed; retrying")
                    await asyncio.sleep(self._poll_interval)

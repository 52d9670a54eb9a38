"""The shard map a worker routes by, and its checks of each request's routing (its
registration is in ``dialog_api/app.py``)."""

from __future__ import annotations

import logging

import asyncpg

from dialogs import errors
from dialogs.metastore import maps
from dialogs.shard_map import ShardMap
from dialogs.watch import MetadataWatcher

log = logging.getLogger(__name__)


class MapView:
    """The newest shard map this worker has seen. Never goes backwards."""

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self.map: ShardMap | None = None
        self.watcher: MetadataWatcher | None = None
        self.dsns: dict[str, str] = {}  # every registered shard's database (the inbox applier's)

    async def load(self, con: asyncpg.Connection) -> None:
        fresh = await maps.newer_map(con, self.map)
        self.dsns = await maps.shard_dsns(con)
        if fresh is not None and (self.map is None or fresh.map_version > self.map.map_version):
            self.map = fresh  # (checked again: another load may have swapped a newer one in meanwhile)

    @property
    def map_version(self) -> int:
        return self.map.map_version if self.map is not None else 0

    async def check_route(self, dialog_key: int, routed_version: int) -> None:
        """Refuse a request routed with an older map, or to a dialog this shard does not own."""
        await self.catch_up(routed_version)
        self.check_loaded_route(dialog_key, routed_version)

    async def catch_up(self, routed_version: int) -> None:
        """Reload the map once if a proxy routed by a newer one than this worker has."""
        if routed_version > self.map_version and self.watcher is not None:
            await self.watcher.refresh()

    def check_loaded_route(self, dialog_key: int, routed_version: int) -> None:
        """check_route against the map as loaded (after ``catch_up``)."""
        current = self.map
        if current is None:
            raise errors.ShardUnavailable("worker has not loaded a shard map yet")
        if routed_version < current.map_version:
            raise errors.StaleMap(current.map_version)
        if current.owner(dialog_key) != self.shard_id:
            if routed_version == current.map_version:
                raise errors.StaleMap(current.map_version, "dialog is not on this shard")
            # The proxy has a newer map than this worker could load: let it retry later.
            raise errors.ShardUnavailable("worker cannot confirm the newer shard map yet")

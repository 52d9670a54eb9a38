"""The proxy's read-only view of the cluster: the active shard map and the live workers.

Built by ``load`` from the metadata database (driven by ``dialogs.watch``); when that
database is down the last view stays in force, so routing goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import asyncpg

from dialogs.metastore import maps, members
from dialogs.shard_map import ShardMap

# After a connection to a worker fails, skip it for this long (it may be restarting).
WORKER_BACKOFF_SECONDS = 2.0


@dataclass
class _ShardWorkers:
    urls: list[str]
    turn: itertools.count = field(default_factory=itertools.count)


def live_workers(
    workers: list[members.WorkerInfo], ttl: float, healthy_for: float, previously_live: set[str]
) -> dict[str, list[str]]:
    """Each shard's live worker URLs: a heartbeat younger than ``ttl``.

    While the metadata database was down (or stalled) no heartbeat could land, so right
    after it comes back every registration looks stale. A worker that was live before
    the outage stays live until the database has been healthy for ``ttl`` seconds, time
    enough for its own next heartbeat; dropping it earlier would 503 its shard's dialogs.
    """
    live: dict[str, list[str]] = {}
    in_grace = healthy_for < ttl
    for worker in workers:
        if worker.age_seconds <= ttl or (in_grace and worker.url in previously_live):
            live.setdefault(worker.shard_id, []).append(worker.url)
    return live


class Topology:
    def __init__(self, worker_ttl: float, poll_interval: float) -> None:
        self.map: ShardMap | None = None
        self._worker_ttl = worker_ttl
        # Loads come at least every poll interval: a longer gap between two, or one load
        # that took this long, means the database was unreachable or stalled meanwhile.
        self._outage_after = 2 * poll_interval + 1.0
        self._last_load = -float("inf")
        self._healthy_since = -float("inf")
        self._workers: dict[str, _ShardWorkers] = {}
        self._down_until: dict[str, float] = {}
        self._changed = asyncio.Event()

    async def load(self, con: asyncpg.Connection) -> None:
        """Read the active map and the workers (the watcher calls this on every change)."""
        began = time.monotonic()
        fresh = await maps.newer_map(con, self.map)
        if fresh is not None and (self.map is None or fresh.map_version > self.map.map_version):
            self.map = fresh
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        registered = await members.workers(con)
        now = time.monotonic()
        if now - began > self._outage_after or began - self._last_load > self._outage_after:
            self._healthy_since = now
        self._last_load = now
        previously_live = {url for workers in self._workers.values() for url in workers.urls}
        live = live_workers(registered, self._worker_ttl, now - self._healthy_since, previously_live)
        self._workers = {
            shard_id: self._workers[shard_id]
            if shard_id in self._workers and self._workers[shard_id].urls == urls
            else _ShardWorkers(urls)
            for shard_id, urls in live.items()
        }

    async def wait_for_change(self, timeout: float) -> None:
        """Return when the next map version is loaded, or after ``timeout`` seconds."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass

    @property
    def map_version(self) -> int:
        return self.map.map_version if self.map is not None else 0

    def candidates(self, shard_id: str) -> list[str]:
        """The shard's workers to try, in order: round-robin, recently failed ones last."""
        workers = self._workers.get(shard_id)
        if workers is None or not workers.urls:
            return []
        start = next(workers.turn) % len(workers.urls)
        ordered = workers.urls[start:] + workers.urls[:start]
        now = time.monotonic()
        healthy = [url for url in ordered if self._down_until.get(url, 0) <= now]
        return healthy + [url for url in ordered if url not in healthy]

    def mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + WORKER_BACKOFF_SECONDS

    def mark_up(self, url: str) -> None:
        self._down_until.pop(url, None)

    def workers(self, shard_id: str) -> list[str]:
        """The shard's live workers' URLs (a switchover pauses their writes)."""
        workers = self._workers.get(shard_id)
        return list(workers.urls) if workers else []

    def worker_count(self, shard_id: str) -> int:
        workers = self._workers.get(shard_id)
        return len(workers.urls) if workers else 0

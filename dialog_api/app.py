"""create_app(settings): the worker for one shard."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from dialog_api import handlers
from dialog_api.appkeys import CHANNELS, GROUP_COMMIT, INBOX_READS, MAP_VIEW, METRICS, SETTINGS, STORE
from dialog_api.channels import Channels
from dialog_api.group_commit import GroupCommit
from dialog_api.inbox_applier import InboxApplier
from dialog_api.map_view import MapView
from dialog_api.metrics import WorkerMetrics
from dialog_api.settings import WorkerSettings
from dialog_api.storage import ShardStore, upgrade_schema
from dialogs import errors, heartbeat, pg, wire
from dialogs.aio import background
from dialogs.http import make_middleware
from dialogs.metastore import members
from dialogs.watch import MetadataWatcher

log = logging.getLogger(__name__)

INBOX_SCHEMA = 7  # the shard schema upgrade that brings the inbox (0007_inbox.sql)
MAX_BATCH_BYTES = 64 * 1024**2  # a proxy's batch (a POST's body, a channel's message)


async def _reset_if_needed(con: asyncpg.Connection) -> None:
    """The worker leaves no session state behind (no SET, LISTEN or session locks), so a
    connection goes back to the pool as it is, saving asyncpg's reset round trip on every
    release; only one left inside a transaction is reset."""
    if con.is_in_transaction():
        await con.reset()


# Every statement the worker prepares looks rows up by key, where a generic plan is the plan;
# PostgreSQL would otherwise plan some afresh on every run (a batch of lists takes its
# queries as arrays, whose custom plans it never finds dearer than a generic one):
# measured 0.6 ms of planning per batch against 0.15 ms of execution.
_PLANS = {"plan_cache_mode": "force_generic_plan"}


async def _shard_pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    applied = await upgrade_schema(settings.shard_dsn, until=settings.schema_until or None)
    if applied:
        log.info("upgraded the shard schema: %s", ", ".join(applied))
    async with pg.create_pool(
        settings.shard_dsn,
        reset=_reset_if_needed,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        command_timeout=settings.query_timeout,
        # Named in pg_stat_activity, for an operator (and a test) to tell them apart.
        server_settings={**_PLANS, "application_name": f"dialogs worker {settings.shard_id}"},
    ) as pool:
        app[STORE] = ShardStore(pool, app[METRICS].observe_query, acquire_timeout=settings.query_timeout)
        app[METRICS].watch(
            lambda: app[MAP_VIEW].map_version,
            lambda: pool.get_size() - pool.get_idle_size(),
            pool.get_idle_size,
        )
        yield


async def _map_watcher(app: web.Application) -> AsyncIterator[None]:
    settings, view = app[SETTINGS], app[MAP_VIEW]
    view.watcher = MetadataWatcher(settings.metadata_dsn, [wire.MAP_CHANNEL], view.load, settings.poll_interval)
    async with background(view.watcher.run()):
        if not await view.watcher.wait_loaded(timeout=10):
            log.warning("no shard map loaded yet; answering 503 until the metadata database is reachable")
        yield


async def _registration(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    worker_id = settings.worker_id or f"{settings.shard_id}-{uuid.uuid4().hex[:8]}"
    view, who = app[MAP_VIEW], f"worker {worker_id} of {settings.shard_id} at {settings.url}"

    async def beat(con: asyncpg.Connection) -> None:
        await members.upsert_worker(con, worker_id, settings.shard_id, settings.url, view.map_version)

    async def leave(con: asyncpg.Connection) -> None:
        await members.delete_worker(con, worker_id)

    async with heartbeat.registered(settings.metadata_dsn, beat, leave, settings.heartbeat_interval, who):
        yield


async def _rows_gauge(app: web.Application) -> AsyncIterator[None]:
    store, gauge = app[STORE], app[METRICS].rows_estimate

    async def refresh_forever() -> None:
        while True:
            try:
                gauge.set(await store.rows_estimate())
            except errors.ShardUnavailable:
                pass
            await asyncio.sleep(15)

    async with background(refresh_forever()):
        yield


async def _group_commit(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    committer = GroupCommit(app[STORE], settings.batch_max, settings.flushers, metrics.observe_commit)
    app[GROUP_COMMIT] = committer
    metrics.writes_paused.set_function(lambda: float(committer.paused))
    async with background(committer.run()):
        yield


async def _inbox_applier(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if 0 < settings.schema_until < INBOX_SCHEMA:  # a bench's worker of the release before the inbox
        yield
        return
    applier = InboxApplier(
        settings.shard_dsn,
        app[MAP_VIEW],
        app[METRICS],
        settings.inbox_batch,
        settings.inbox_poll_interval,
        settings.query_timeout,
    )
    async with background(applier.run()):
        yield


async def _close_channels(app: web.Application) -> None:
    app[CHANNELS].close_all()


def inbox_reads_at_once(pool_max: int) -> int:
    """Inbox reads of batches (pages, unread totals) that may hold a pooled connection at
    once in a worker, whatever the number of batches and proxies: half the pool, so that
    sends and lists (which share it) always find connections."""
    return max(1, pool_max // 2)


def create_app(settings: WorkerSettings) -> web.Application:
    metrics = WorkerMetrics(settings.shard_id)
    app = web.Application(middlewares=[make_middleware(metrics.http)], client_max_size=MAX_BATCH_BYTES)
    app[SETTINGS] = settings
    app[CHANNELS] = Channels(settings.idle_timeout, MAX_BATCH_BYTES, metrics)
    app[INBOX_READS] = asyncio.Semaphore(inbox_reads_at_once(settings.pool_max))
    app.on_shutdown.append(_close_channels)
    app[METRICS] = metrics
    app[MAP_VIEW] = MapView(settings.shard_id)
    # Order matters: teardown runs in reverse, so registration goes first and the pool last.
    app.cleanup_ctx.extend([_shard_pool, _rows_gauge, _map_watcher, _group_commit, _inbox_applier, _registration])
    handlers.setup_routes(app)
    return app

"""create_app(settings): the routing proxy."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
from aiohttp import web

from dialogs import heartbeat, pg, schema, wire
from dialogs.aio import background
from dialogs.http import make_middleware
from dialogs.metastore import members
from dialogs.metastore.store import MetadataStore
from dialogs.watch import MetadataWatcher
from proxy import handlers
from proxy.appkeys import (
    FORWARDER,
    KNOWN_USERS,
    LOGIN_GUARD,
    METADATA,
    METRICS,
    OWN_URL,
    PASSWORDS,
    PROXY_ID,
    SETTINGS,
    TOKENS,
    TOPOLOGY,
    WATCHER,
)
from proxy.auth import Passwords, TokenAuthority
from proxy.forwarder import Forwarder
from proxy.login_guard import FailureLimit, LoginGuard
from proxy.metrics import ProxyMetrics
from proxy.migration.driver import MigrationDriver
from proxy.migration.runner import Observer, RunnerSettings
from proxy.settings import ProxySettings
from proxy.topology import Topology
from proxy.users import KnownUsers

log = logging.getLogger(__name__)


async def _passwords(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[PASSWORDS] = Passwords(
        settings.password_time_cost,
        settings.password_memory_kib,
        settings.password_concurrency or max(1, (os.cpu_count() or 1) // settings.processes),
        settings.password_wait,
    )
    yield
    app[PASSWORDS].close()


async def _schema(app: web.Application) -> AsyncIterator[None]:
    # Proxies start while the metadata database may be down: they then route as soon as
    # it comes back, and another proxy or `python -m proxy.bootstrap` upgrades the schema.
    try:
        con = await pg.connect(app[SETTINGS].metadata_dsn, timeout=5)
    except pg.FAILURES as exc:
        log.warning("metadata database unreachable at start, schema not upgraded: %s", exc)
    else:
        try:
            applied = await schema.upgrade_metadata(con)
            if applied:
                log.info("upgraded the metadata schema: %s", ", ".join(applied))
        finally:
            await con.close()
    yield


async def _metadata_pool(app: web.Application) -> AsyncIterator[None]:
    async with pg.create_pool(app[SETTINGS].metadata_dsn, min_size=0, max_size=10, timeout=5) as pool:
        app[METADATA] = MetadataStore(pool)
        app[KNOWN_USERS] = KnownUsers(app[METADATA])
        yield


async def _topology(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    topology = Topology(settings.worker_ttl, settings.poll_interval)
    watcher = MetadataWatcher(
        settings.metadata_dsn, [wire.MAP_CHANNEL, wire.WORKERS_CHANNEL], topology.load, settings.poll_interval
    )
    app[TOPOLOGY], app[WATCHER] = topology, watcher
    app[METRICS].watch(
        lambda: topology.map_version, lambda: float(watcher.connected), lambda: topology.map, topology.worker_count
    )
    async with background(watcher.run()):
        if not await watcher.wait_loaded(timeout=10):
            log.warning("no shard map loaded yet; dialog requests answer 503 until one is")
        yield


async def _forwarder(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Shorter than the workers' idle timeout (75 s by default): the worker never closes a
    # connection this proxy still means to reuse.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[FORWARDER] = Forwarder(
            session,
            app[TOPOLOGY],
            app[WATCHER],
            app[METRICS],
            settings.forward_timeout,
            settings.cutover_wait,
            settings.failover_wait,
            settings.max_buffered,
            settings.internal_secret,
            settings.send_batch_max,
            settings.send_batches_in_flight,
            settings.worker_channels,
        )
        yield
        await app[FORWARDER].batcher.close()


async def _registration(app: web.Application) -> AsyncIterator[None]:
    """Register this proxy with the map version it routes by (cleanup waits for it)."""
    settings, topology = app[SETTINGS], app[TOPOLOGY]
    proxy_id = app[PROXY_ID]
    url, who = app[OWN_URL], f"proxy {proxy_id}"

    async def beat(con: asyncpg.Connection) -> None:
        await members.upsert_proxy(con, proxy_id, url, topology.map_version)

    async def leave(con: asyncpg.Connection) -> None:
        await members.delete_proxy(con, proxy_id)

    async with heartbeat.registered(settings.metadata_dsn, beat, leave, settings.heartbeat_interval, who):
        yield


async def _migration_driver(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    if not settings.migration_driver:
        yield
        return
    observer = Observer(metrics.observe_phase, metrics.observe_rows, metrics.observe_cutover)
    runner_settings = RunnerSettings(
        cutover_deadline=settings.cutover_deadline, liveness_ttl=settings.worker_ttl, observer=observer
    )
    driver = MigrationDriver(settings.metadata_dsn, runner_settings, poll_interval=min(settings.poll_interval, 1.0))
    async with background(driver.run()):
        yield


def create_app(settings: ProxySettings, own_url: str | None = None, proxy_id: str | None = None) -> web.Application:
    """The proxy; ``own_url`` reaches this process alone (default http://ADVERTISE_HOST:PORT), and
    ``proxy_id`` names its registration (default DIALOGS_PROXY_ID, or a random one)."""
    metrics = ProxyMetrics()
    app = web.Application(
        middlewares=[make_middleware(metrics.http, settings.write_timeout)], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[OWN_URL] = own_url or f"http://{settings.advertise_host or settings.host}:{settings.port}"
    app[PROXY_ID] = proxy_id or settings.proxy_id or f"proxy-{uuid.uuid4().hex[:8]}"
    app[METRICS] = metrics
    app[TOKENS] = TokenAuthority(settings.jwt_secret, settings.jwt_ttl)
    app[LOGIN_GUARD] = LoginGuard(
        per_address=FailureLimit(settings.login_failures_per_address, settings.login_failure_window),
        per_pair=FailureLimit(settings.login_failures_per_user, settings.login_failure_window),
        per_user=FailureLimit(settings.login_failures_per_user_total, settings.login_failure_window),
    )
    app.cleanup_ctx.extend(
        [_passwords, _schema, _metadata_pool, _topology, _forwarder, _registration, _migration_driver]
    )
    handlers.setup_routes(app)
    return app

"""The `dialogs` command: run the local cluster, inspect it, and the process entry points."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import asyncpg
import click
from rich.console import Console
from rich.table import Table

from dialogs import metadata, pgmigrate
from dialogs.bootstrap import bootstrap
from dialogs.settings import SettingsError

DEFAULT_DATA_DIR = ".dialogs"


def _data_dir_option() -> click.Option:  # type: ignore[return-value]
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("DIALOGS_DATA_DIR", DEFAULT_DATA_DIR),
        show_default=f"$DIALOGS_DATA_DIR or {DEFAULT_DATA_DIR}",
        help="Where the local cluster keeps its databases, logs and cluster.json.",
    )


@click.group()
def main() -> None:
    """Dialogs: sharded private messages with online resharding."""


@main.command()
@_data_dir_option()
@click.option("--port", type=int, default=lambda: int(os.environ.get("DIALOGS_PROXY_PORT", 8080)),
              show_default="$DIALOGS_PROXY_PORT or 8080", help="Proxy port (first start only; then kept).")
@click.option("--shards", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Shards to create on the first start.")
def up(data_dir: Path, port: int, shards: int) -> None:
    """Run the local cluster in the foreground: metadata + shards on embedded PostgreSQL, workers, proxy."""
    from dialogs.cluster import ClusterLayout
    from dialogs.supervisor import AlreadyRunning, Supervisor, acquire_lock

    console = Console(soft_wrap=True)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = acquire_lock(data_dir)
    except AlreadyRunning as exc:
        console.print(f"[red]{exc}[/red]; stop it with Ctrl-C in its terminal, or use another --data-dir.")
        sys.exit(1)
    try:
        layout = ClusterLayout.load(data_dir)
        if layout is None:
            layout = ClusterLayout.create(data_dir, port, shards)
            layout.save()
        sys.exit(Supervisor(layout, console).run())
    finally:
        lock.close()


@main.command()
@_data_dir_option()
def status(data_dir: Path) -> None:
    """Show the active shard map, each shard's share of keys and rows, and the workers."""
    from dialogs.cluster import ClusterLayout

    console = Console(soft_wrap=True)
    layout = ClusterLayout.load(data_dir.resolve())
    if layout is None:
        console.print(f"[red]no cluster in {data_dir.resolve()}[/red]: run `dialogs up` first")
        sys.exit(1)
    try:
        report = asyncio.run(_status(layout.metadata_dsn))
    except (OSError, asyncpg.PostgresError) as exc:
        console.print(f"[red]metadata database unreachable[/red] ({exc}); is `dialogs up` running?")
        sys.exit(1)
    shard_map, shards, workers, rows = report
    console.print(f"proxy {layout.proxy_url}   active map version [bold]{shard_map.map_version}[/bold]")
    table = Table("shard", "weight", "share of keys", "rows", "workers", "dsn")
    shares = shard_map.ring.shares()
    for shard_id in shard_map.shard_ids:
        live = [w for w in workers if w.shard_id == shard_id]
        table.add_row(
            shard_id,
            str(shard_map.weights[shard_id]),
            f"{shares[shard_id]:.1%}",
            "unreachable" if rows[shard_id] is None else f"{rows[shard_id]:,}",
            ", ".join(f"{w.url} ({w.age_seconds:.0f}s ago)" for w in live) or "none",
            shards.get(shard_id, "?"),
        )
    console.print(table)


async def _status(metadata_dsn: str):  # type: ignore[no-untyped-def]
    con = await asyncpg.connect(metadata_dsn, timeout=3)
    try:
        shard_map = await metadata.active_map(con)
        shards = await metadata.shard_dsns(con)
        workers = await metadata.workers(con)
    finally:
        await con.close()
    if shard_map is None:
        raise click.ClickException("no shard map yet: the cluster has not been bootstrapped")
    rows: dict[str, int | None] = {}
    for shard_id in shard_map.shard_ids:
        try:
            shard_con = await asyncpg.connect(shards[shard_id], timeout=3)
            try:
                rows[shard_id] = await shard_con.fetchval("SELECT count(*) FROM messages")
            finally:
                await shard_con.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, KeyError):
            rows[shard_id] = None
    return shard_map, shards, workers, rows


@main.command()
@click.option("--metadata-dsn", envvar="DIALOGS_METADATA_DSN", required=True, help="[env DIALOGS_METADATA_DSN]")
@click.option("--shard", "shards", multiple=True, metavar="ID=DSN",
              help="Register a shard; on an empty cluster the first map is made of these.")
def migrate(metadata_dsn: str, shards: tuple[str, ...]) -> None:
    """Apply metadata migrations; with --shard, also shard migrations and (on an empty cluster) the first map."""
    parsed = {}
    for entry in shards:
        shard_id, sep, dsn = entry.partition("=")
        if not sep:
            raise click.BadParameter(f"expected ID=DSN, got {entry!r}", param_hint="--shard")
        parsed[shard_id] = dsn

    async def run() -> None:
        if parsed:
            shard_map = await bootstrap(metadata_dsn, parsed)
            click.echo(f"active shard map version {shard_map.map_version}: {', '.join(shard_map.shard_ids)}")
            return
        con = await asyncpg.connect(metadata_dsn)
        try:
            applied = await pgmigrate.apply(con, metadata.METADATA_MIGRATIONS)
            click.echo(f"metadata migrations applied: {', '.join(applied) or 'none (up to date)'}")
        finally:
            await con.close()

    asyncio.run(run())


def _serve(build) -> None:  # type: ignore[no-untyped-def]
    from aiohttp import web

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app, host, port = build()
    except SettingsError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=10)


@main.command()
def proxy() -> None:
    """Run one proxy (configured by DIALOGS_* environment variables)."""
    from dialogs.settings import load
    from proxy.app import create_app
    from proxy.settings import ProxySettings

    def build():  # type: ignore[no-untyped-def]
        settings = load(ProxySettings)
        return create_app(settings), settings.host, settings.port

    _serve(build)


@main.command()
def worker() -> None:
    """Run one dialog_api worker for one shard (configured by DIALOGS_* environment variables)."""
    from dialog_api.app import create_app
    from dialog_api.settings import WorkerSettings
    from dialogs.settings import load

    def build():  # type: ignore[no-untyped-def]
        settings = load(WorkerSettings)
        return create_app(settings), settings.host, settings.port

    _serve(build)

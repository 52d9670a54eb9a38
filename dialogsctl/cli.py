"""The `dialogs` command: run the local cluster, inspect it, and the process entry points."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from dialogs import pg
from dialogs.metastore import maps, members
from dialogs.wire import FINISHED_PHASES, Phase
from proxy.migration import shard_sql

if TYPE_CHECKING:  # imported where used: `dialogs --help` stays fast
    from dialogsctl.admin_client import AdminClient, AdminError

FC = TypeVar("FC", bound=Callable[..., Any])  # a click command, as click's decorators type it

DEFAULT_DATA_DIR = ".dialogs"


def _console() -> Console:
    """A console for tables: when stdout is not a terminal (piped, redirected), lines are
    never cut to 80 columns: URLs and DSNs are printed whole."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


# A shard whose messages cannot be counted for `status` (down, or not registered).
_NO_COUNT: tuple[type[BaseException], ...] = (*pg.FAILURES, KeyError)


def _no_cluster(data_dir: Path, remote: bool = True) -> str:
    return (
        f"no local cluster in {data_dir.resolve()} (it has no cluster.json). `dialogs up` keeps its cluster in"
        f" {DEFAULT_DATA_DIR}/ of the folder it was started in: point there with --data-dir PATH or"
        " DIALOGS_DATA_DIR=PATH, or start one with `dialogs up`"
        + (", or reach any deployment with --url and --token" if remote else "")
    )


def _data_dir_option() -> Callable[[FC], FC]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("DIALOGS_DATA_DIR", DEFAULT_DATA_DIR),
        show_default=f"$DIALOGS_DATA_DIR or {DEFAULT_DATA_DIR}",
        help="Where the local cluster keeps its databases, logs and cluster.json.",
    )


class ConfigurationError(click.ClickException):
    """A bad environment: one line, exit status 2 (as the services' settings errors)."""

    exit_code = 2


def _check_port_range() -> None:
    """Before a command that starts servers chooses their ports (dialogsctl/net.py)."""
    from dialogsctl.net import PORT_RANGE_VARIABLE, port_range

    try:
        port_range(os.environ.get(PORT_RANGE_VARIABLE))
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


@click.group()
def main() -> None:
    """Dialogs: sharded private messages with online resharding."""


@main.command()
@_data_dir_option()
@click.option(
    "--port",
    type=int,
    default=lambda: int(os.environ.get("DIALOGS_PROXY_PORT", 8080)),
    show_default="$DIALOGS_PROXY_PORT or 8080",
    help="Proxy port (first start only; then kept).",
)
@click.option(
    "--shards", type=click.IntRange(1, 16), default=2, show_default=True, help="Shards to create on the first start."
)
@click.option(
    "--replicas",
    type=click.IntRange(0, 4),
    default=None,
    help="Standbys per database (first start only; then kept; default 0): each shard and the metadata"
    " database become a Patroni group with a synchronous standby, and fail over by themselves.",
)
@click.option(
    "--with-prometheus",
    is_flag=True,
    help="Also run Prometheus (the machine's, e.g. Debian's package) scraping every process.",
)
def up(data_dir: Path, port: int, shards: int, replicas: int | None, with_prometheus: bool) -> None:
    """Run the local cluster in the foreground: metadata + shards on embedded PostgreSQL, workers, proxy."""
    from dialogsctl.cluster import ClusterLayout
    from dialogsctl.supervisor import AlreadyRunning, Supervisor, acquire_lock

    _check_port_range()
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
            layout = ClusterLayout.create(data_dir, port, shards, replicas or 0)
            layout.save()
        elif replicas is not None and replicas != layout.replicas:
            console.print(
                f"[red]the cluster in {data_dir} was created with --replicas {layout.replicas}[/red];"
                " the number of standbys is chosen on the first start (use another --data-dir)."
            )
            sys.exit(2)
        sys.exit(Supervisor(layout, console, with_prometheus).run())
    finally:
        lock.close()


@main.command()
@_data_dir_option()
@click.option("--url", envvar="DIALOGS_ADMIN_URL", help="A proxy's URL, for any deployment [env DIALOGS_ADMIN_URL].")
@click.option("--token", envvar="DIALOGS_ADMIN_TOKEN", help="Its admin token [env DIALOGS_ADMIN_TOKEN].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the tables.")
def status(data_dir: Path, url: str | None, token: str | None, as_json: bool) -> None:
    """Show the active shard map, each shard's share of keys and rows, and the workers.

    Of the local cluster in --data-dir (rows counted in each shard); with --url/--token (or
    DIALOGS_ADMIN_URL/DIALOGS_ADMIN_TOKEN), of any deployment, through its admin API."""
    from dialogsctl.cluster import ClusterLayout
    from dialogsctl.pg_auth import redacted

    if url or token:  # (the other one, if missing, from the local cluster)
        _remote_status(_client(data_dir, url, token), as_json)
        return
    layout = ClusterLayout.load(data_dir.resolve())
    if layout is None:
        raise click.ClickException(_no_cluster(data_dir))
    console = _console()
    try:
        report = asyncio.run(_status(layout.metadata_dsn))
    except pg.FAILURES as exc:
        console.print(f"[red]metadata database unreachable[/red] ({exc}); is `dialogs up` running?")
        sys.exit(1)
    shard_map, shards, workers, rows, running = report
    shares = shard_map.ring.shares()
    entries = [
        {
            "shard_id": shard_id,
            "weight": shard_map.weights[shard_id],
            "share": shares[shard_id],
            "rows": rows[shard_id],
            "workers": [
                {"url": w.url, "heartbeat_seconds_ago": round(w.age_seconds, 1)}
                for w in workers
                if w.shard_id == shard_id
            ],
            "dsn": redacted(shards.get(shard_id, "?")),
        }
        for shard_id in shard_map.shard_ids
    ]
    replication = _replication(layout)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "proxy": layout.proxy_url,
                    "map_version": shard_map.map_version,
                    "migration": running,
                    "shards": entries,
                    "replication": replication,
                },
                indent=2,
            )
        )
        return
    console.print(f"proxy {layout.proxy_url}   active map version [bold]{shard_map.map_version}[/bold]")
    _print_running(console, running)
    table = Table("shard", "weight", "share of keys", "rows", "workers", "dsn")
    for entry in entries:
        table.add_row(
            entry["shard_id"],
            str(entry["weight"]),
            f"{entry['share']:.1%}",
            "unreachable" if entry["rows"] is None else f"{entry['rows']:,}",
            ", ".join(f"{w['url']} ({w['heartbeat_seconds_ago']:.0f}s ago)" for w in entry["workers"]) or "none",
            entry["dsn"],
        )
    console.print(table)
    if replication:
        console.print(_members_table(replication, port=True))


def _replication(layout: Any) -> dict[str, list[dict[str, Any]]]:
    """Each replicated database's members, as Patroni reports them (empty: not replicated)."""
    from dataclasses import asdict

    from dialogsctl.supervisor import replicated_group

    if not layout.replicas:
        return {}
    names = ["meta", *(shard.shard_id for shard in layout.active_shards)]
    return {name: [asdict(m) for m in replicated_group(layout, name).status()] for name in names}


def _print_running(console: Console, progress: dict[str, Any] | None) -> None:
    from dialogsctl.progress import describe

    if progress is None:
        console.print("no migration running")
        return
    console.print(
        describe(progress) + f", rows copied {progress['rows_copied']:,} of {progress['rows_total']:,},"
        f" {progress['elapsed_seconds']:.0f}s elapsed",
        highlight=False,
    )


def _remote_status(client: AdminClient, as_json: bool) -> None:
    """`status` of any deployment, from its admin API (no row counts: they need the shards)."""
    shard_map = _run_admin(lambda: client.call("GET", "/admin/map"))
    shards = _run_admin(lambda: client.call("GET", "/admin/shards"))
    running = next(
        (m for m in _run_admin(lambda: client.call("GET", "/admin/migrations")) if m["phase"] not in FINISHED_PHASES),
        None,
    )
    replication = _run_admin(lambda: client.call("GET", "/admin/replication"))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "proxy": client.url,
                    "map_version": shard_map["map_version"],
                    "migration": running,
                    "shards": shards,
                    "replication": replication,
                },
                indent=2,
            )
        )
        return
    console = _console()
    console.print(f"proxy {client.url}   active map version [bold]{shard_map['map_version']}[/bold]")
    _print_running(console, running)
    console.print(_shard_table(shards))
    if replication:
        console.print(_members_table(replication, port=False))


def _members_table(replication: dict[str, list[dict[str, Any]]], port: bool) -> Table:
    columns = ["database", "member", "role", "state", "timeline", "lag (bytes)"] + (["port"] if port else [])
    table = Table(*columns)
    for name, statuses in replication.items():
        for m in statuses:
            lag = "" if m["lag_bytes"] is None else f"{m['lag_bytes']:,}"
            timeline = "" if m["timeline"] is None else str(m["timeline"])
            row = [name, m["name"], m["role"], m["state"], timeline, lag] + ([str(m["pg_port"])] if port else [])
            table.add_row(*row)
    return table


async def _status(metadata_dsn: str) -> tuple[Any, Any, Any, Any, Any]:
    from dialogs.metastore import migrations

    con = await pg.connect(metadata_dsn, timeout=3)
    try:
        shard_map = await maps.active_map(con)
        shards = await maps.shard_dsns(con)
        workers = await members.workers(con)
        active = await migrations.active(con)
        running = None
        if active is not None:
            from proxy.admin import migration_json

            running = migration_json(active, *await migrations.range_counts(con, active.migration_id))
    finally:
        await con.close()
    if shard_map is None:
        raise click.ClickException("no shard map yet: the cluster has not been bootstrapped")
    rows: dict[str, int | None] = {}
    for shard_id in shard_map.shard_ids:
        try:
            shard_con = await pg.connect(shards[shard_id], timeout=3)
            try:
                rows[shard_id] = await shard_sql.message_count(shard_con)
            finally:
                await shard_con.close()
        except _NO_COUNT:
            rows[shard_id] = None
    return shard_map, shards, workers, rows, running


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bootstrap(args: tuple[str, ...]) -> None:
    """Upgrade the schemas and write the first shard map (python -m proxy.bootstrap; --help for options)."""
    from proxy import bootstrap as command

    sys.exit(command.main(list(args)))


# The name it had: "migrate" read like resharding's migrations.
main.add_command(
    click.Command(
        "migrate",
        callback=bootstrap.callback,
        params=bootstrap.params,
        hidden=True,
        context_settings={"ignore_unknown_options": True, "help_option_names": []},
    )
)


@main.command()
def proxy() -> None:
    """Run the proxy (python -m proxy; DIALOGS_PROCESSES on one port), configured by DIALOGS_* variables."""
    from proxy.processes import main as run_proxy

    sys.exit(run_proxy())


@main.command()
def worker() -> None:
    """Run one worker for one shard (python -m dialog_api), configured by DIALOGS_* variables."""
    from dialog_api.app import create_app
    from dialog_api.settings import WorkerSettings
    from dialogs.serve import serve

    serve(WorkerSettings, create_app, "worker")


# --- operating shards and migrations (through the proxy's admin API) ---------------------


def _admin_options(command: FC) -> FC:
    command = click.option("--token", envvar="DIALOGS_ADMIN_TOKEN", help="Admin token [env DIALOGS_ADMIN_TOKEN].")(
        command
    )
    command = click.option("--url", envvar="DIALOGS_ADMIN_URL", help="A proxy's URL [env DIALOGS_ADMIN_URL].")(command)
    return _data_dir_option()(command)


def _client(data_dir: Path, url: str | None, token: str | None) -> AdminClient:
    """The admin API of --url/--token, or else of the local cluster in --data-dir."""
    from dialogsctl.admin_client import AdminClient
    from dialogsctl.cluster import ClusterLayout

    if url and token:
        return AdminClient(url, token)
    layout = ClusterLayout.load(data_dir.resolve())
    if layout is None:
        if url or token:  # half of a remote deployment's address
            missing = "--token (or DIALOGS_ADMIN_TOKEN)" if url else "--url (or DIALOGS_ADMIN_URL)"
            raise click.ClickException(
                f"{missing} is missing: give both --url and --token for a deployment"
                f" other than a local cluster (none in {data_dir.resolve()})"
            )
        raise click.ClickException(_no_cluster(data_dir))
    return AdminClient(url or layout.proxy_url, token or layout.admin_token)


def _throttle_options(command: FC) -> FC:
    command = click.option(
        "--batch-size", type=click.IntRange(100, 100_000), default=5000, show_default=True, help="Rows per copy batch."
    )(command)
    command = click.option(
        "--rows-per-second",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Copy throttle; 0 copies as fast as the servers allow.",
    )(command)
    return click.option("--no-wait", is_flag=True, help="Return once the migration has started.")(command)


def _run_admin(action: Callable[[], Any]) -> Any:
    from dialogsctl.admin_client import AdminError

    try:
        return action()
    except AdminError as exc:
        raise click.ClickException(exc.message) from None


def _start_and_follow(client: AdminClient, method: str, path: str, body: Any, no_wait: bool) -> Any:
    return _follow(client, _run_admin(lambda: client.call(method, path, body)), no_wait)


def _follow(client: AdminClient, migration: dict[str, Any], no_wait: bool) -> Any:
    from dialogsctl.progress import describe, follow

    console = Console(soft_wrap=True)
    console.print("started " + describe(migration), highlight=False)
    if no_wait:
        return migration
    return _run_admin(lambda: follow(client, migration["migration_id"], console))


@main.group()
def shard() -> None:
    """Add, remove and reweight shards; each starts an online migration."""


@shard.command("switchover")
@click.argument("shard_id")
@click.option("--to", "candidate", help="The member to promote (default: the synchronous standby).")
@_admin_options
def shard_switchover(shard_id: str, candidate: str | None, data_dir: Path, url: str | None, token: str | None) -> None:
    """Hand a replicated shard's (or `meta`'s) primary role to a standby, for maintenance.

    Patroni stops the primary, promotes the synchronous standby (no acknowledged write is
    lost: every commit is on both) and makes the old primary its standby. The shard's
    workers pause their writes first, and proxies hold the shard's requests meanwhile;
    clients see a slower answer, not an error. Through the admin API of --url (a
    deployment, e.g. docker-compose.ha.yaml) or of the local cluster's proxy."""
    from dialogsctl.admin_client import AdminError

    client = _client(data_dir, url, token)
    client.timeout = 60.0  # the proxy waits up to 30 s for Patroni, and for the workers' pauses
    try:
        done = client.call("POST", f"/admin/shards/{shard_id}/switchover", {"to": candidate} if candidate else {})
    except AdminError as exc:
        raise click.ClickException(exc.message) from None
    workers = done.get("workers", 0)
    paused = f"; {done.get('workers_paused', 0)} of {workers} workers paused their writes" if workers else ""
    click.echo(
        f"{shard_id}: {done['from']} -> {done['to']} in {done['seconds']:.1f} s{paused}; {done['from']} follows it"
        " as a standby"
    )


@shard.command("add")
@click.argument("shard_id", required=False)
@click.option(
    "--dsn",
    help="An empty database of its own for the new shard (never another shard's). Without it, the local cluster"
    " starts a new server.",
)
@click.option(
    "--patroni",
    "patroni_urls",
    help="With --dsn of a replicated database: its members' Patroni REST URLs, comma-separated"
    " (switchovers, Prometheus' discovery).",
)
@click.option("--weight", type=click.IntRange(1, 100), default=1, show_default=True)
@_throttle_options
@_admin_options
def shard_add(
    shard_id: str | None,
    dsn: str | None,
    patroni_urls: str | None,
    weight: int,
    no_wait: bool,
    rows_per_second: int,
    batch_size: int,
    data_dir: Path,
    url: str | None,
    token: str | None,
) -> None:
    """Add a shard and move its share of dialogs onto it while traffic flows."""
    from dialogsctl import local_shard
    from dialogsctl.admin_client import AdminError

    local = dsn is None
    members: list[str] | None = None
    if patroni_urls is not None:  # checked before anything is asked or started for nothing
        if local:
            raise click.UsageError("--patroni goes with --dsn (the local cluster registers its own members)")
        from proxy.bootstrap import parse_urls

        try:
            members = parse_urls(patroni_urls, "--patroni")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    if local:
        _check_port_range()
    client = _client(data_dir, url, token)
    known: set[int] = set()
    created = None
    if local:
        try:  # the migrations before ours, to tell ours apart if the add gets no clear answer
            known = {m["migration_id"] for m in client.call("GET", "/admin/migrations")}
        except AdminError:
            pass  # the add below will say why
        try:
            created, dsn = local_shard.start(data_dir.resolve(), shard_id, click.echo)
            shard_id = created.shard_id
        except local_shard.LocalShardError as exc:
            raise click.ClickException(str(exc)) from None
    elif shard_id is None:
        raise click.UsageError("--dsn needs a SHARD_ID")
    assert shard_id is not None
    body: dict[str, Any] = {
        "shard_id": shard_id,
        "dsn": dsn,
        "weight": weight,
        "rows_per_second": rows_per_second,
        "batch_size": batch_size,
    }
    if created is not None and created.members:  # a replicated local shard: switchovers through the API
        body["patroni_urls"] = [f"http://127.0.0.1:{rest}" for _, rest in created.members]
    elif members is not None:
        body["patroni_urls"] = members
    try:
        started = client.call("POST", "/admin/shards", body)
    except AdminError as exc:
        # Refused: the server and worker started for it would run on as orphans.
        if created is not None and _local_add_not_taken(client, exc, shard_id, known):
            try:
                local_shard.take_back(data_dir.resolve(), created, click.echo)
            except local_shard.LocalShardError as undo:
                click.echo(str(undo), err=True)
        raise click.ClickException(exc.message) from None
    migration = _follow(client, started, no_wait)
    if migration["phase"] == Phase.ABORTED:
        sys.exit(1)


def _local_add_not_taken(client: AdminClient, error: AdminError, shard_id: str, known: set[int]) -> bool:
    """Whether the proxy certainly did not take the new local shard, so it may be taken back."""
    from dialogsctl import local_shard
    from dialogsctl.admin_client import AdminError

    if local_shard.refused(error.status):
        return True
    try:  # a 5xx or no answer: the migration may have started all the same
        return not local_shard.started_since(client.call("GET", "/admin/migrations"), shard_id, known)
    except AdminError:
        click.echo(f"could not tell whether the proxy took {shard_id}; it keeps running", err=True)
        return False


@shard.command("remove")
@click.argument("shard_id")
@_throttle_options
@_admin_options
def shard_remove(
    shard_id: str,
    no_wait: bool,
    rows_per_second: int,
    batch_size: int,
    data_dir: Path,
    url: str | None,
    token: str | None,
) -> None:
    """Drain a shard onto the others, then retire it (the local cluster stops its server)."""
    import signal

    from dialogsctl.cluster import ClusterLayout
    from dialogsctl.supervisor import running_pid

    client = _client(data_dir, url, token)
    path = f"/admin/shards/{shard_id}?rows_per_second={rows_per_second}&batch_size={batch_size}"
    migration = _start_and_follow(client, "DELETE", path, None, no_wait)
    retired = False
    with ClusterLayout.edit(data_dir.resolve()) as layout:
        local = layout.shard(shard_id) if layout else None
        if migration["phase"] == Phase.DONE and local is not None:
            local.retired = retired = True
    if retired:
        pid = running_pid(data_dir.resolve())
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
    if migration["phase"] == Phase.ABORTED:
        sys.exit(1)


@shard.command("weight")
@click.argument("shard_id")
@click.argument("weight", type=click.IntRange(1, 100))
@_throttle_options
@_admin_options
def shard_weight(
    shard_id: str,
    weight: int,
    no_wait: bool,
    rows_per_second: int,
    batch_size: int,
    data_dir: Path,
    url: str | None,
    token: str | None,
) -> None:
    """Change a shard's share of dialogs (its weight relative to the others)."""
    client = _client(data_dir, url, token)
    body = {"weight": weight, "rows_per_second": rows_per_second, "batch_size": batch_size}
    migration = _start_and_follow(client, "PUT", f"/admin/shards/{shard_id}/weight", body, no_wait)
    if migration["phase"] == Phase.ABORTED:
        sys.exit(1)


@shard.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@_admin_options
def shard_list(as_json: bool, data_dir: Path, url: str | None, token: str | None) -> None:
    """Registered shards: in the map or not, weight, share of keys, live workers."""
    shards = _run_admin(lambda: _client(data_dir, url, token).call("GET", "/admin/shards"))
    if as_json:
        click.echo(json.dumps(shards, indent=2))
        return
    _console().print(_shard_table(shards))


def _shard_table(shards: list[dict[str, Any]]) -> Table:
    table = Table("shard", "in map", "weight", "share of keys", "workers", "dsn")
    for entry in shards:
        state = "retired" if entry["retired"] else ("yes" if entry["in_map"] else "no")
        table.add_row(
            entry["shard_id"],
            state,
            str(entry["weight"] or "-"),
            f"{entry['share']:.1%}",
            ", ".join(entry["workers"]) or "none",
            entry["dsn"],
        )
    return table


@main.command("map")
@_admin_options
def show_map(data_dir: Path, url: str | None, token: str | None) -> None:
    """The active shard map with each shard's share of keys."""
    shard_map = _run_admin(lambda: _client(data_dir, url, token).call("GET", "/admin/map"))
    console = Console(soft_wrap=True)
    console.print(f"map version {shard_map['map_version']} ({shard_map['vnodes_base']} virtual nodes per weight unit)")
    table = Table("shard", "weight", "share of keys")
    for entry in shard_map["shards"]:
        table.add_row(entry["shard_id"], str(entry["weight"]), f"{entry['share']:.1%}")
    console.print(table)


@main.group()
def inbox() -> None:
    """The users' inboxes (conversations and unread counts), kept from the dialogs."""


@inbox.command("verify")
@click.option("--repair", is_flag=True, help="Rewrite what differs from the recount (refused during a migration).")
@click.option(
    "--settle",
    type=click.IntRange(0, 600),
    default=30,
    show_default=True,
    help="Seconds to wait for the outboxes to drain before comparing.",
)
@_admin_options
def inbox_verify(repair: bool, settle: int, data_dir: Path, url: str | None, token: str | None) -> None:
    """Recount every inbox from the dialogs and report (or, with --repair, fix) any difference.

    Exits 1 when differences remain (found and not repaired)."""
    client = _client(data_dir, url, token)
    client.timeout = settle + 120.0  # the proxy waits for the outboxes, then reads every shard
    report = _run_admin(
        lambda: client.call("POST", "/admin/inbox/verify", {"repair": repair, "settle_seconds": settle})
    )
    click.echo(
        f"{report['dialogs']} dialogs recounted, {report['rows']} inbox rows expected:"
        f" {report['differences']} difference(s)"
        + (f", {report['pending']} outbox row(s) still pending" if report["pending"] else "")
        + (f"; {report['repaired']} row(s) repaired and every total recounted" if report["repaired"] else "")
    )
    for kind in ("missing", "different", "extra", "totals"):
        for line in report[kind]:
            click.echo(f"  {kind}: {line}")
    if report["differences"] and not repair:
        sys.exit(1)


@main.command("admin-token")
@_data_dir_option()
@click.option(
    "--env",
    "as_env",
    is_flag=True,
    help='Print `export DIALOGS_ADMIN_URL=… DIALOGS_ADMIN_TOKEN=…` lines, for `eval "$(dialogs admin-token --env)"`.',
)
def admin_token(data_dir: Path, as_env: bool) -> None:
    """The local cluster's admin token (for the admin API's curl examples, or --token)."""
    import shlex

    from dialogsctl.cluster import ClusterLayout

    layout = ClusterLayout.load(data_dir.resolve())
    if layout is None:
        raise click.ClickException(_no_cluster(data_dir, remote=False))
    if as_env:
        click.echo(f"export DIALOGS_ADMIN_URL={shlex.quote(layout.proxy_url)}")
        click.echo(f"export DIALOGS_ADMIN_TOKEN={shlex.quote(layout.admin_token)}")
    else:
        click.echo(layout.admin_token)


@main.group()
def migration() -> None:
    """Show, follow, throttle and abort migrations."""


@migration.command("list")
@_admin_options
def migration_list(data_dir: Path, url: str | None, token: str | None) -> None:
    """Recent migrations, newest first."""
    from dialogsctl.progress import describe

    entries = _run_admin(lambda: _client(data_dir, url, token).call("GET", "/admin/migrations"))
    if not entries:
        click.echo("no migrations yet (`dialogs shard add` starts one)")
    for entry in entries:
        click.echo(describe(entry) + (f" ({entry['error']})" if entry.get("error") else ""))


@migration.command("show")
@click.argument("migration_id", type=int)
@_admin_options
def migration_show(migration_id: int, data_dir: Path, url: str | None, token: str | None) -> None:
    """One migration's progress, as JSON."""
    click.echo(json.dumps(_run_admin(lambda: _client(data_dir, url, token).migration(migration_id)), indent=2))


@migration.command("follow")
@click.argument("migration_id", type=int)
@_admin_options
def migration_follow(migration_id: int, data_dir: Path, url: str | None, token: str | None) -> None:
    """A live progress bar until the migration ends."""
    from dialogsctl.progress import follow

    client = _client(data_dir, url, token)
    _run_admin(lambda: follow(client, migration_id, Console(soft_wrap=True)))


@migration.command("abort")
@click.argument("migration_id", type=int)
@_admin_options
def migration_abort(migration_id: int, data_dir: Path, url: str | None, token: str | None) -> None:
    """Abort before the flip: the old owners keep every range, the targets are emptied."""
    from dialogsctl.progress import describe, follow

    client = _client(data_dir, url, token)
    _run_admin(lambda: client.call("POST", f"/admin/migrations/{migration_id}/abort"))
    result = _run_admin(lambda: follow(client, migration_id, Console(soft_wrap=True)))
    click.echo(describe(result))


@migration.command("throttle")
@click.argument("migration_id", type=int)
@click.option("--rows-per-second", type=click.IntRange(0))
@click.option("--batch-size", type=click.IntRange(100, 100_000))
@_admin_options
def migration_throttle(
    migration_id: int,
    rows_per_second: int | None,
    batch_size: int | None,
    data_dir: Path,
    url: str | None,
    token: str | None,
) -> None:
    """Change a running migration's copy rate or batch size."""
    body = {k: v for k, v in (("rows_per_second", rows_per_second), ("batch_size", batch_size)) if v is not None}
    result = _run_admin(lambda: _client(data_dir, url, token).call("PATCH", f"/admin/migrations/{migration_id}", body))
    click.echo(f"rows_per_second={result['rows_per_second']} batch_size={result['batch_size']}")


@main.command("run-migration")
def run_migration() -> None:
    """Run the active migration in this process until it ends (python -m proxy.migration).

    Proxies do this on their own; this is for running it elsewhere, or with
    DIALOGS_MIGRATION_DRIVER=false on the proxies. Configured by DIALOGS_* variables."""
    from proxy.migration.__main__ import main as run

    sys.exit(run())

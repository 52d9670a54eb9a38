"""`dialogs up`: run the whole local cluster in the foreground, stop it all on Ctrl-C.

Start order: PostgreSQL servers (metadata, then shards), schema upgrades and the
bootstrap shard map, one worker per shard, the proxy. Stop order is the reverse. A
worker or proxy that dies is restarted with backoff; a second `dialogs up` on the same
data folder is refused by an exclusive lock instead of fighting over the servers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml
from rich.console import Console

from dialogs import pg
from dialogsctl import backoff, embedded, patroni, pg_home
from dialogsctl.cluster import DATABASE, ClusterLayout, ShardLayout
from dialogsctl.embedded import SYSTEM_USER, LocalPostgres, PostgresError, die_with_parent, stop_child
from dialogsctl.net import free_port
from dialogsctl.pg_auth import redacted
from proxy.bootstrap import bootstrap

LOCK_FILE = "up.lock"
# Seconds proxies of a replicated cluster hold requests while a shard has no primary: a
# failover takes about patroni.TTL seconds (measured: docs/architecture.md).
FAILOVER_WAIT = patroni.TTL + 10


class AlreadyRunning(Exception):
    pass


class StartFailed(Exception):
    pass


def running_pid(data_dir: Path) -> int | None:
    """The pid of the `dialogs up` that holds ``data_dir``, or None when none does."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def acquire_lock(data_dir: Path) -> IO[str]:
    """Hold this open for the cluster's lifetime; the OS drops the lock if we die."""
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open on purpose, closed by the caller
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise AlreadyRunning(f"a cluster is already running from {data_dir} (pid {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@dataclass
class Restarts:
    """A supervised process's crash history: what `backoff.after_exit` decides from."""

    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None  # set while a restart is pending

    def exited(self, now: float) -> float:
        """Record an exit seen at ``now``; the delay before the restart."""
        self.failures, delay = backoff.after_exit(self.failures, now - self.started_at)
        self.restart_at = now + delay
        return delay


def proxy_processes() -> int:
    """Proxy processes for a machine that also runs the workers and PostgreSQL: half its CPUs
    (why, with the measurements behind it: bench/README.md, "Send throughput")."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass
class Child:
    """A process of the cluster: a worker, a proxy, or Prometheus."""

    name: str
    env: dict[str, str]
    command: str
    log_file: Path
    health_url: str
    argv: list[str] | None = None  # default: `python -m COMMAND` (a service's package)
    process: subprocess.Popen[bytes] | None = None
    restarts: Restarts = field(default_factory=Restarts)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.restarts.started_at = time.monotonic()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - the child's log, closed when it stops
        self.process = subprocess.Popen(
            self.argv or [sys.executable, "-m", self.command],
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops us in order
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            stop_child(self.process, signal.SIGTERM, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise StartFailed(
                    f"{self.name} exited at start; last lines of {self.log_file}:\n{embedded.tail(self.log_file)}"
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise StartFailed(f"{self.name} did not become healthy in {timeout}s; see {self.log_file}")


async def _create_database(server: LocalPostgres | patroni.Group) -> None:
    con = await pg.connect(server.dsn("postgres"))
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await con.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await con.close()


async def _prepare_databases(layout: ClusterLayout, servers: dict[str, LocalPostgres | patroni.Group]) -> None:
    for server in servers.values():
        await _create_database(server)
    patroni = {
        s.shard_id: [f"http://127.0.0.1:{rest}" for _, rest in s.members] for s in layout.active_shards if s.members
    }
    metadata_patroni = [f"http://127.0.0.1:{rest}" for _, rest in layout.meta_members] if layout.replicas else None
    shards = {s.shard_id: layout.shard_dsn(s) for s in layout.active_shards}
    await bootstrap(layout.metadata_dsn, shards, patroni, metadata_patroni)


def replicated_group(layout: ClusterLayout, name: str) -> patroni.Group:
    """The Patroni group of database ``name`` (``meta`` or a shard) of a replicated cluster."""
    return patroni.Group(
        layout.data_dir / "pg",
        name,
        layout.etcd_url,
        [(pg_port, rest_port) for pg_port, rest_port in layout.members(name)],
        layout.server_password(name),
        layout.replication_password,
        layout.data_dir / "logs",
    )


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Supervisor:
    def __init__(self, layout: ClusterLayout, console: Console, with_prometheus: bool = False) -> None:
        self.layout = layout
        self.console = console
        self.with_prometheus = with_prometheus
        self.servers: dict[str, LocalPostgres] = {}
        self.server_restarts: dict[str, Restarts] = {}
        # Replicated (`--replicas N`): etcd, and a Patroni group per database instead of a server.
        self.etcd: patroni.Etcd | None = None
        self.etcd_restarts = Restarts()
        self.groups: dict[str, patroni.Group] = {}
        self.member_restarts: dict[str, Restarts] = {}
        self.children: list[Child] = []
        self._stopping = False
        self._reload = False

    def _server(self, name: str, port: int) -> LocalPostgres:
        return LocalPostgres(
            self.layout.pg_dir(name),
            port,
            password=self.layout.server_password(name),
            log_file=self.layout.log_file(f"pg-{name}"),
        )

    def _start_group(self, name: str) -> patroni.Group:
        group = replicated_group(self.layout, name)
        for member in group.members:
            self.member_restarts.setdefault(member.name, Restarts()).started_at = time.monotonic()
        try:
            group.start()
        except PostgresError:
            group.stop()
            raise
        self.groups[name] = group
        return group

    def _worker(self, shard: ShardLayout) -> Child:
        layout = self.layout
        return Child(
            name=f"worker {shard.shard_id}",
            command="dialog_api",
            env={
                "DIALOGS_METADATA_DSN": layout.metadata_dsn,
                "DIALOGS_INTERNAL_SECRET": layout.internal_secret,
                "PYTHONUNBUFFERED": "1",
                "DIALOGS_SHARD_ID": shard.shard_id,
                "DIALOGS_SHARD_DSN": layout.shard_dsn(shard),
                "DIALOGS_PORT": str(shard.worker_port),
                "DIALOGS_WORKER_ID": f"{shard.shard_id}-local",
            },
            log_file=layout.log_file(f"worker-{shard.shard_id}"),
            health_url=f"http://127.0.0.1:{shard.worker_port}/health",
        )

    def _prometheus(self) -> Child | None:
        """Prometheus from the machine (Debian's package), scraping this cluster, or None."""
        binary = shutil.which("prometheus")
        if binary is None:
            self.console.print(
                "[yellow]prometheus is not installed (apt-get install prometheus); starting without it[/yellow]"
            )
            return None
        layout = self.layout
        if layout.prometheus_port is None:
            with ClusterLayout.edit(layout.data_dir) as fresh:  # a `shard add` may be writing it too
                assert fresh is not None
                fresh.prometheus_port = layout.prometheus_port = free_port()
        self._write_prometheus_config()
        workdir = layout.data_dir / "prometheus"
        return Child(
            name="prometheus",
            command="prometheus",
            env={},
            log_file=layout.log_file("prometheus"),
            health_url=f"http://127.0.0.1:{layout.prometheus_port}/-/ready",
            argv=[
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{layout.prometheus_port}",
            ],
        )

    def _write_prometheus_config(self) -> None:
        layout = self.layout
        workdir = layout.data_dir / "prometheus"
        workdir.mkdir(parents=True, exist_ok=True)
        # Targets from the registrations (proxy/discovery.py): every proxy process, and the
        # worker of a shard added later, without rewriting this file.
        jobs: list[dict[str, object]] = [
            {
                "job_name": f"dialogs-{role}" if role != "patroni" else "patroni",
                "http_sd_configs": [
                    {"url": f"{layout.proxy_url}/discovery/prometheus?role={role}", "refresh_interval": "5s"}
                ],
            }
            # Patroni's own metrics (roles, timeline, WAL positions) from every member's REST
            # API, a replicated shard added later included: none when nothing is replicated.
            for role in ("proxy", "worker", "patroni")
        ]
        config: dict[str, object] = {
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "scrape_configs": jobs,
        }
        rules = CONFIGS / "prometheus" / "alerts.yml"
        if rules.exists():
            shutil.copy(rules, workdir / "alerts.yml")
            config["rule_files"] = ["alerts.yml"]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))

    def planned_children(self) -> list[Child]:
        layout = self.layout
        common = {
            "DIALOGS_METADATA_DSN": layout.metadata_dsn,
            "DIALOGS_INTERNAL_SECRET": layout.internal_secret,
            "PYTHONUNBUFFERED": "1",
        }
        children = [self._worker(shard) for shard in layout.active_shards]
        children.append(
            Child(
                name="proxy",
                command="proxy",
                env={
                    **common,
                    "DIALOGS_PORT": str(layout.proxy_port),
                    "DIALOGS_PROCESSES": os.environ.get("DIALOGS_PROCESSES") or str(proxy_processes()),
                    "DIALOGS_JWT_SECRET": layout.jwt_secret,
                    "DIALOGS_ADMIN_TOKEN": layout.admin_token,
                    # A replicated shard's primary is replaced in about patroni.TTL seconds:
                    # requests wait that out instead of failing.
                    **({"DIALOGS_FAILOVER_WAIT": str(FAILOVER_WAIT)} if layout.replicas else {}),
                },
                log_file=layout.log_file("proxy"),
                health_url=f"{layout.proxy_url}/health",
            )
        )
        return children

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._reload = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            self._start()
            self._banner()
            self._watch()
            return 0
        except StartFailed as exc:
            self.console.print(f"[red]start failed:[/red] {exc}")
            return 1
        finally:
            self._stop()

    def _start(self) -> None:
        layout = self.layout
        if layout.replicas:
            self._start_replicated()
        else:
            with self.console.status("starting PostgreSQL servers"):
                self.servers["meta"] = self._server("meta", layout.meta_port)
                for shard in layout.active_shards:
                    self.servers[shard.shard_id] = self._server(shard.shard_id, shard.pg_port)
                for name, server in self.servers.items():
                    try:
                        self._start_server(name, server)
                    except PostgresError as exc:
                        raise StartFailed(f"PostgreSQL {name}: {exc}") from None
            self._placement_note()
        with self.console.status("upgrading schemas"):
            asyncio.run(_prepare_databases(layout, {**self.servers, **self.groups}))
        self.children = self.planned_children()
        if self.with_prometheus and (prometheus := self._prometheus()) is not None:
            self.children.append(prometheus)
        for child in self.children:
            if self._stopping:
                raise StartFailed("interrupted")
            with self.console.status(f"starting {child.name}"):
                child.start()
                child.wait_healthy()

    def _start_replicated(self) -> None:
        layout = self.layout
        with self.console.status("starting etcd"):
            client, peer = layout.etcd_ports
            self.etcd = patroni.Etcd(layout.data_dir / "etcd", client, peer, layout.log_file("etcd"))
            self.etcd_restarts.started_at = time.monotonic()
            try:
                self.etcd.start()
            except PostgresError as exc:
                raise StartFailed(str(exc)) from None
        for name in ["meta", *(shard.shard_id for shard in layout.active_shards)]:
            with self.console.status(f"starting {name}: a primary and {layout.replicas} standby(s) under Patroni"):
                try:
                    self._start_group(name)
                except PostgresError as exc:
                    raise StartFailed(f"{name}: {exc}") from None

    def _start_server(self, name: str, server: LocalPostgres) -> None:
        self.server_restarts.setdefault(name, Restarts()).started_at = time.monotonic()
        server.start()

    def _restart_server(self, name: str, server: LocalPostgres) -> None:
        """Start a crashed server again (LocalPostgres.start copes with what the crash left:
        a stale postmaster.pid, orphaned backends). Blocks the watch loop while it recovers."""
        try:
            self._start_server(name, server)
        except PostgresError as exc:
            # The next watch round sees it down again and waits longer (backoff).
            self.console.print(f"[red]PostgreSQL {name} did not start:[/red] {exc}", highlight=False)
            return
        self.console.print(f"PostgreSQL {name} is back", highlight=False)

    def _placement_note(self) -> None:
        """Say once, plainly, when the data is not where the user asked (see dialogsctl/pg_home.py)."""
        if not any(server.relocated for server in self.servers.values()):
            return
        pg_dir = self.layout.data_dir / "pg"
        closed = pg_home.closed_ancestor(pg_dir, pwd.getpwnam(SYSTEM_USER))
        self.console.print(
            f"PostgreSQL runs as the {SYSTEM_USER} user, who cannot enter {closed}: its data is kept in"
            f" {pg_home.ROOT_HOME / 'data'}, linked from {pg_dir} (no folder's permissions were changed)",
            highlight=False,
        )

    def _apply_layout(self) -> None:
        """`dialogs shard add/remove` changed cluster.json: start new shards, stop the ones
        retired or no longer listed (a refused `shard add` is taken back that way)."""
        self._reload = False
        fresh = ClusterLayout.load(self.layout.data_dir)
        if fresh is None:
            return
        self.layout = fresh
        wanted = {shard.shard_id for shard in fresh.active_shards}
        running = self._running_databases()
        for shard_id in [name for name in running if name != "meta" and name not in wanted]:
            self._stop_shard(shard_id)
        for shard in fresh.active_shards:
            if shard.shard_id not in running:
                self._start_shard(shard)
        # Prometheus finds new and retired workers itself (http_sd from the registrations).

    def _running_databases(self) -> set[str]:
        """The databases this supervisor runs: single servers and replicated groups alike."""
        return set(self.servers) | set(self.groups)

    def _stop_shard(self, shard_id: str) -> None:
        worker = next((c for c in self.children if c.name == f"worker {shard_id}"), None)
        if worker is not None:
            worker.stop()
            self.children.remove(worker)
        server = self.servers.pop(shard_id, None)
        self.server_restarts.pop(shard_id, None)
        if server is not None:
            server.stop()
        group = self.groups.pop(shard_id, None)
        if group is not None:
            group.stop()
        if self.layout.shard(shard_id) is not None:
            self.console.print(
                f"stopped retired shard {shard_id} (its data stays in {self.layout.pg_dir(shard_id)})", highlight=False
            )
        else:  # a refused `dialogs shard add` took it back; the CLI removes its empty data
            self.console.print(f"stopped shard {shard_id}: its addition was taken back", highlight=False)

    def _start_shard(self, shard: ShardLayout) -> None:
        """Start a new shard's server and worker. If either fails, only this shard is affected:
        what started is stopped again, and the next change of cluster.json retries it."""
        if self.layout.replicas:
            self._start_replicated_shard(shard)
            return
        server = self._server(shard.shard_id, shard.pg_port)
        worker: Child | None = None
        try:
            self._start_server(shard.shard_id, server)
            asyncio.run(_create_database(server))
            worker = self._worker(shard)
            worker.start()
            worker.wait_healthy()
        except Exception as exc:  # whatever it is, it is this shard's failure, not the cluster's
            self.console.print(f"[red]could not start shard {shard.shard_id}:[/red] {exc}", highlight=False)
            if worker is not None:
                worker.stop()
            server.stop()
            self.server_restarts.pop(shard.shard_id, None)
            return
        self.servers[shard.shard_id] = server
        self.children.insert(0, worker)
        self.console.print(
            f"started shard {shard.shard_id}: {redacted(self.layout.shard_dsn(shard))},"
            f" worker http://127.0.0.1:{shard.worker_port}",
            highlight=False,
        )

    def _start_replicated_shard(self, shard: ShardLayout) -> None:
        worker: Child | None = None
        try:
            group = self._start_group(shard.shard_id)
            asyncio.run(_create_database(group))
            worker = self._worker(shard)
            worker.start()
            worker.wait_healthy()
        except Exception as exc:  # this shard's failure, not the cluster's
            self.console.print(f"[red]could not start shard {shard.shard_id}:[/red] {exc}", highlight=False)
            if worker is not None:
                worker.stop()
            started = self.groups.pop(shard.shard_id, None)
            (started or replicated_group(self.layout, shard.shard_id)).stop()
            return
        self.children.insert(0, worker)
        self.console.print(
            f"started shard {shard.shard_id} ({self.layout.replicas + 1} servers):"
            f" {redacted(self.layout.shard_dsn(shard))}, worker http://127.0.0.1:{shard.worker_port}",
            highlight=False,
        )

    def _watch(self) -> None:
        while not self._stopping:
            if self._reload:
                self._apply_layout()
            for name, server in list(self.servers.items()):
                self._keep_up(
                    f"PostgreSQL {name}",
                    server.running,
                    server.process.returncode if server.process else None,
                    self.server_restarts[name],
                    functools.partial(self._restart_server, name, server),
                )
            if self.etcd is not None:
                process = self.etcd.process
                self._keep_up(
                    "etcd",
                    process is not None and process.poll() is None,
                    process.returncode if process else None,
                    self.etcd_restarts,
                    self._restart_etcd,
                )
            for group in self.groups.values():
                for member in group.members:
                    # A member whose Patroni died (its host "lost") is started again: it
                    # rejoins as a standby of whoever is primary now (pg_rewind if needed).
                    self._keep_up(
                        f"Patroni {member.name}",
                        member.running,
                        member.process.returncode if member.process else None,
                        self.member_restarts[member.name],
                        functools.partial(self._restart_member, member),
                    )
            for child in self.children:
                self._keep_up(child.name, child.alive, child.exit_code, child.restarts, child.restart)
            time.sleep(0.2)

    def _restart_etcd(self) -> None:
        assert self.etcd is not None
        self.etcd_restarts.started_at = time.monotonic()
        try:
            self.etcd.start()
        except PostgresError as exc:
            self.console.print(f"[red]etcd did not start:[/red] {exc}", highlight=False)

    def _restart_member(self, member: patroni.PatroniMember) -> None:
        self.member_restarts[member.name].started_at = time.monotonic()
        member.kill()  # what is left of it (PostgreSQL processes of a Patroni that died)
        member.start()
        self.console.print(f"Patroni {member.name} started again (it rejoins as a standby)", highlight=False)

    def _keep_up(
        self, name: str, alive: bool, exit_code: int | None, restarts: Restarts, restart: Callable[[], None]
    ) -> None:
        """Servers and children alike: an exit is noticed, then the restart waits its backoff."""
        if alive or self._stopping:
            return
        now = time.monotonic()
        if restarts.restart_at is None:
            delay = restarts.exited(now)
            self.console.print(f"[yellow]{name} exited ({exit_code}); restarting in {delay:g}s[/yellow]")
        elif now >= restarts.restart_at:
            restarts.restart_at = None
            restart()

    def _stop(self) -> None:
        """Proxies and workers, then the databases, each kind all at once (every stop is
        mostly waiting: one at a time, a replicated cluster took 15 s), then etcd, which the
        Patroni members use until they are down."""
        self.console.print("stopping…")
        _all_at_once([child.stop for child in self.children])
        _all_at_once([server.stop for server in self.servers.values()] + [g.stop for g in self.groups.values()])
        if self.etcd is not None:
            self.etcd.stop()
        self.console.print("stopped; data kept in " + str(self.layout.data_dir))

    def _banner(self) -> None:
        layout = self.layout
        url = layout.proxy_url
        lines = [
            f"[bold green]Dialogs is up.[/bold green] Data: {layout.data_dir}",
            f"  proxy          {url}   (OpenAPI: {url}/openapi.json, metrics: {url}/metrics)",
            f"  metadata       {redacted(layout.metadata_dsn)}",
        ]
        for shard in layout.active_shards:
            lines.append(
                f"  {shard.shard_id:<14} {redacted(layout.shard_dsn(shard))}   worker http://127.0.0.1:{shard.worker_port}"
            )
        if layout.replicas:
            lines.append(
                f"  replicas       {layout.replicas} standby(s) per database (one synchronous) under Patroni,"
                f" etcd {layout.etcd_url} (`dialogs status` shows roles; `dialogs shard switchover`)"
            )
        if any(c.name == "prometheus" for c in self.children):
            lines.append(f"  prometheus     http://127.0.0.1:{layout.prometheus_port}")
        lines.append(f"  logs           {layout.data_dir / 'logs'}")
        lines.append(
            f"  secrets        {layout.data_dir / 'cluster.json'} (PostgreSQL passwords; the admin token:"
            " `dialogs admin-token`)"
        )
        self.console.print("\n".join(lines), highlight=False, soft_wrap=True)
        self.console.print("\nTry it (copy and paste):", highlight=False)
        self.console.print(walkthrough(url), highlight=False, markup=False, soft_wrap=True)
        self.console.print(
            "\nCtrl-C stops everything; starting it again (`make up` or `dialogs up`) keeps the data.", highlight=False
        )


def walkthrough(url: str) -> str:
    extract = 'sed -E \'s/.*"{field}": ?"([^"]+)".*/\\1/\''
    register = (
        "curl -s {url}/user/register -H 'Content-Type: application/json'"
        ' -d \'{{"first_name":"{name}","second_name":"Test","password":"password-{name}"}}\''
    )
    login = (
        "curl -s {url}/login -H 'Content-Type: application/json'"
        ' -d "{{\\"id\\":\\"${var}\\",\\"password\\":\\"password-{name}\\"}}"'
    )
    return "\n".join(
        [
            f"A=$({register.format(url=url, name='Anna')} | {extract.format(field='user_id')})",
            f"B=$({register.format(url=url, name='Boris')} | {extract.format(field='user_id')})",
            f"TA=$({login.format(url=url, var='A', name='Anna')} | {extract.format(field='token')})",
            f"TB=$({login.format(url=url, var='B', name='Boris')} | {extract.format(field='token')})",
            (
                f"curl -s -w '\\n' {url}/dialog/$B/send -H \"Authorization: Bearer $TA\""
                " -H 'Content-Type: application/json' -d '{\"text\":\"Hi Boris\"}'"
            ),
            (
                f"curl -s -w '\\n' {url}/dialog/$A/send -H \"Authorization: Bearer $TB\""
                " -H 'Content-Type: application/json' -d '{\"text\":\"Hi Anna\"}'"
            ),
            f"curl -s -w '\\n' {url}/dialog/$B/list -H \"Authorization: Bearer $TA\"",
            f"curl -s -w '\\n' {url}/dialog/$A/list -H \"Authorization: Bearer $TB\"",
        ]
    )


def _all_at_once(stops: list[Callable[[], None]]) -> None:
    """Run ``stops`` in threads and wait for all; the first failure is raised after."""
    if not stops:
        return
    with concurrent.futures.ThreadPoolExecutor(len(stops)) as pool:
        futures = [pool.submit(stop) for stop in stops]
    for future in futures:
        future.result()

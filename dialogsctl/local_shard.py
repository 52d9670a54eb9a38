"""A new shard of the local cluster for `dialogs shard add`: started, or taken back.

The running `dialogs up` starts and stops servers and workers when ``cluster.json``
changes (it is told with SIGHUP). Adding a shard writes it there and waits for its worker;
if the proxy then does not take the shard, writing it out again stops them, and its data
folder (made by this add, so holding nothing) is removed, so no orphan keeps running and
the same name can be added later.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dialogsctl import pg_home, postmaster
from dialogsctl.cluster import ClusterLayout, ShardLayout
from dialogsctl.supervisor import running_pid

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class LocalShardError(Exception):
    pass


def refused(status: int) -> bool:
    """Whether an admin API answer proves the shard was not taken: a 4xx is decided before
    anything is written (a 5xx or no answer at all may come after a migration started)."""
    return 400 <= status < 500


def started_since(migrations: Iterable[dict[str, Any]], shard_id: str, known: set[int]) -> bool:
    """Whether ``migrations`` (the admin API's list) has an add of ``shard_id`` not in ``known``."""
    return any(m["kind"] == "add" and m["shard_id"] == shard_id and m["migration_id"] not in known for m in migrations)


def start(data_dir: Path, shard_id: str | None, echo: Callable[[str], None]) -> tuple[ShardLayout, str]:
    """Have the running `dialogs up` start a server and a worker for a new shard: (its layout, dsn)."""
    pid = running_pid(data_dir)
    with ClusterLayout.edit(data_dir) as layout:
        if layout is None or pid is None:
            raise LocalShardError(f"no running local cluster in {data_dir}: start `dialogs up`, or pass --dsn")
        try:
            new = layout.add_shard(shard_id)
        except ValueError as exc:
            raise LocalShardError(str(exc)) from None
    os.kill(pid, signal.SIGHUP)
    echo(f"starting {new.shard_id}: PostgreSQL on 127.0.0.1:{new.pg_port} (a new server: initdb takes a few seconds)…")
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    said_worker = False
    while time.monotonic() < deadline:
        if not said_worker and _listening(new.pg_port):
            echo(
                f"  PostgreSQL is up after {time.monotonic() - started:.1f} s; starting its worker on"
                f" :{new.worker_port}…"
            )
            said_worker = True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{new.worker_port}/health", timeout=1) as response:
                if response.status == 200:
                    echo(f"  {new.shard_id} is ready after {time.monotonic() - started:.1f} s")
                    return new, layout.shard_dsn(new)
        except OSError:
            pass
        time.sleep(0.2)
    take_back(data_dir, new, echo)
    raise LocalShardError(
        f"the worker of {new.shard_id} did not start; see {layout.log_file('worker-' + new.shard_id)}"
        f" and {layout.log_file('pg-' + new.shard_id)}"
    )


def take_back(data_dir: Path, created: ShardLayout, echo: Callable[[str], None]) -> None:
    """Undo ``start``: the shard leaves cluster.json, `dialogs up` stops its worker and server,
    and its data folder is removed once nothing runs on it.

    Only what ``start`` made: the entry must still be the one it wrote (same ports and
    password). Anything else under that name (another command's shard) is left alone.
    """
    shard_id = created.shard_id
    with ClusterLayout.edit(data_dir) as layout:
        if layout is None or layout.shard(shard_id) != created:
            echo(f"{shard_id} in cluster.json is not the one this command started; leaving it alone")
            return
        datadir = layout.pg_dir(shard_id)
        layout.forget_shard(shard_id)
    pid = running_pid(data_dir)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _listening(created.worker_port) or postmaster.processes_on(datadir.resolve()):
        if time.monotonic() > deadline:
            raise LocalShardError(
                f"{shard_id} was not added, but its server or worker did not stop; its data stays in {datadir}"
            )
        time.sleep(0.2)
    pg_home.remove_data_directory(datadir)
    echo(f"{shard_id} was not added: its server and worker are stopped and its data folder removed")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0

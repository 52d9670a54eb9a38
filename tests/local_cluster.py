"""`dialogs up` run as a user runs it: a subprocess with its own data folder and port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import psutil

from dialogs.shard_map import ShardMap
from dialogsctl import pg_home
from dialogsctl.cluster import ClusterLayout
from tests.support import active_map


class LocalCluster:
    """One `dialogs up`; ``stop`` ends it and, by pid, anything of it still running."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "DIALOGS_DATA_DIR": str(data_dir), "DIALOGS_PROXY_PORT": str(port)}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.parent / "up.out", "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dialogsctl", "up"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.data_dir.parent / "up.out").read_text()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError("the local cluster did not become healthy")

    @property
    def layout(self) -> ClusterLayout:
        layout = ClusterLayout.load(self.data_dir)
        assert layout is not None
        return layout

    async def shard_map(self) -> ShardMap:
        return await active_map(self.layout.metadata_dsn)

    async def wait_workers(
        self, session: aiohttp.ClientSession, shard_id: str, count: int, timeout: float = 30
    ) -> None:
        """Until the proxy routes to ``count`` workers of ``shard_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with session.get(self.url + "/health") as response:
                health = await response.json()
            if health["shards"].get(shard_id, {}).get("workers", 0) >= count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the proxy never saw {count} workers of {shard_id}: {health}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for proc in cluster_processes(self.data_dir):  # a stopped process would hold the shutdown up
                try:
                    proc.send_signal(signal.SIGCONT)
                except psutil.NoSuchProcess:
                    pass
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for proc in cluster_processes(self.data_dir):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        remove_server_data(self.data_dir)


def cluster_processes(data_dir: Path) -> list[psutil.Process]:
    """Processes of the cluster in ``data_dir``: those whose command line names the folder (or
    where its servers' data really is, when it was kept elsewhere), or that run with it as
    DIALOGS_DATA_DIR."""
    folders = [str(data_dir)]
    if (data_dir / "pg").is_dir():
        folders += [str(link.resolve()) for link in (data_dir / "pg").iterdir() if link.is_symlink()]
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(folder in cmdline for folder in folders) or environ.get("DIALOGS_DATA_DIR") == str(data_dir):
            found.append(proc)
    return found


def remove_server_data(data_dir: Path) -> None:
    """As root in a private folder the servers' data went under /var/lib/dialogs: remove it too."""
    if (data_dir / "pg").is_dir():
        for datadir in (data_dir / "pg").iterdir():
            pg_home.remove_data_directory(datadir)

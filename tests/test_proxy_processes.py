"""DIALOGS_PROCESSES: several proxy processes on one port, each registered and scraped alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from dialogsctl.net import free_port
from tests.support import PROXY_ENV, Api, Cluster


@dataclass
class MultiProxy:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []


def _start(cluster: Cluster, log: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            env={
                **os.environ,
                **PROXY_ENV,
                "DIALOGS_METADATA_DSN": cluster.metadata_dsn,
                "DIALOGS_PORT": str(port),
                "DIALOGS_PROXY_ID": "multi",
                "DIALOGS_PROCESSES": "2",
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes], children: list[psutil.Process]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for child in children:  # only if the parent could not stop them
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
async def multi(bare_cluster: Cluster, tmp_path: Path) -> AsyncIterator[MultiProxy]:
    for shard_id in bare_cluster.shard_dsns:
        await bare_cluster.start_worker(shard_id)
    port = free_port()
    # A stall timeout of 2 s (5 by default): a stopped process is replaced sooner in the test.
    log = tmp_path / "proxy.log"
    proxy = MultiProxy(
        _start(bare_cluster, log, port, DIALOGS_PROCESS_STALL_TIMEOUT="2"), f"http://127.0.0.1:{port}", log
    )
    seen: list[psutil.Process] = []
    try:
        await _until(lambda: _registered(bare_cluster, 2), "both processes registered", proxy)
        seen = proxy.children()
        yield proxy
    finally:
        _stop(proxy.process, seen + proxy.children())


async def _registered(cluster: Cluster, count: int) -> dict[str, str] | None:
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        rows = await con.fetch("SELECT proxy_id, url FROM proxies WHERE heartbeat_at > now() - interval '2 seconds'")
    finally:
        await con.close()
    urls = {row["proxy_id"]: row["url"] for row in rows}
    return urls if len(urls) == count else None


async def _until(probe, what: str, proxy: MultiProxy | None = None, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            result = await probe()
        except (aiohttp.ClientError, OSError):
            result = None
        if result:
            return result
        await asyncio.sleep(0.1)
    log = proxy.log.read_text(errors="replace")[-3000:] if proxy else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


async def _sends_served(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("dialogs_proxy_requests_total{") and "/send" in line
    )


@pytest.mark.timeout(90)
async def test_processes_share_the_port_and_are_scraped_alone(bare_cluster: Cluster, multi: MultiProxy) -> None:
    urls = await _registered(bare_cluster, 2)
    assert urls is not None and sorted(urls) == ["multi-0", "multi-1"]
    assert len(set(urls.values())) == 2 and multi.url not in urls.values()

    # Fresh connections, so the kernel spreads them over both processes.
    api = Api(bare_cluster.session, multi.url)
    _, anna_token = await api.user("Anna")
    boris_id, _ = await api.user("Boris")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        api = Api(fresh, multi.url)
        for number in range(40):
            assert (await api.send(anna_token, boris_id, f"message {number}")).status == 200
        texts = [m["text"] for m in await api.whole_dialog(anna_token, boris_id)]
    assert texts == [f"message {n}" for n in reversed(range(40))]  # newest first
    served = [await _sends_served(url) for url in sorted(urls.values())]
    assert sum(served) == 40 and all(count > 0 for count in served), served
    # What Prometheus is told to scrape: each process, at its own port.
    async with bare_cluster.session.get(multi.url + "/discovery/prometheus", params={"role": "proxy"}) as response:
        assert response.status == 200
        [group] = await response.json()
    assert sorted(group["targets"]) == sorted(url.removeprefix("http://") for url in urls.values())


@pytest.mark.timeout(90)
async def test_a_dead_process_is_replaced_and_the_port_keeps_serving(bare_cluster: Cluster, multi: MultiProxy) -> None:
    api = Api(bare_cluster.session, multi.url)
    _, token = await api.user("Anna")
    other, _ = await api.user("Boris")
    before = await _registered(bare_cluster, 2)
    assert before is not None
    victim, survivor = multi.children()
    victim.kill()
    victim.wait(10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        fresh_api = Api(fresh, multi.url)
        for number in range(20):  # new connections land on the survivor while the other restarts
            assert (await fresh_api.send(token, other, f"during {number}")).status == 200

    async def replaced() -> bool:
        children = multi.children()
        return len(children) == 2 and victim.pid not in {c.pid for c in children}

    await _until(replaced, "a replacement process", multi)
    assert survivor.is_running()

    async def registered_anew() -> dict[str, str] | None:
        urls = await _registered(bare_cluster, 2)
        return urls if urls is not None and urls != before else None

    # Under the same id, at a new port of its own, scraped there.
    urls = await _until(registered_anew, "the replacement registered", multi)
    assert sorted(urls) == sorted(before)
    [fresh_url] = set(urls.values()) - set(before.values())
    assert await _sends_served(fresh_url) == 0


@pytest.mark.timeout(90)
async def test_a_stopped_process_is_killed_and_replaced(bare_cluster: Cluster, multi: MultiProxy) -> None:
    """A child stopped by SIGSTOP (alive, serving nothing) would keep half the new connections:
    the parent sees its heartbeats stop, kills it within the stall timeout (2 s), and starts
    another; from then on every new connection is served at once."""
    api = Api(bare_cluster.session, multi.url)
    _, token = await api.user("Anna")
    other, _ = await api.user("Boris")
    victim, survivor = multi.children()
    stopped_at = asyncio.get_running_loop().time()
    victim.suspend()
    try:
        await _until(
            lambda: asyncio.to_thread(lambda: not victim.is_running()), "the stopped process killed", multi, timeout=10
        )
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.resume()
    killed_after = asyncio.get_running_loop().time() - stopped_at
    assert killed_after < 2.0 + 1.5, killed_after
    assert survivor.is_running()
    slowest = 0.0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        fresh_api = Api(fresh, multi.url)
        for number in range(30):
            started = asyncio.get_running_loop().time()
            assert (await fresh_api.send(token, other, f"after {number}")).status == 200
            slowest = max(slowest, asyncio.get_running_loop().time() - started)
    assert slowest < 1.0, slowest

    async def replaced() -> bool:
        children = multi.children()
        return len(children) == 2 and victim.pid not in {c.pid for c in children}

    await _until(replaced, "a replacement process", multi)


@pytest.mark.timeout(60)
async def test_sigterm_stops_every_process_and_unregisters(bare_cluster: Cluster, multi: MultiProxy) -> None:
    children = multi.children()
    multi.process.send_signal(signal.SIGTERM)
    assert multi.process.wait(15) == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive

    async def unregistered() -> bool:
        return await _registered(bare_cluster, 0) is not None

    await _until(unregistered, "the registrations to be deleted")


@pytest.mark.timeout(60)
async def test_children_die_with_a_killed_parent(multi: MultiProxy) -> None:
    children = multi.children()
    multi.process.kill()
    multi.process.wait(5)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive


@pytest.mark.timeout(60)
def test_a_taken_port_is_a_configuration_error(bare_cluster: Cluster, tmp_path: Path) -> None:
    """SO_REUSEPORT would share a port with another proxy left running: refuse it instead."""
    port = free_port()
    with socket_listening(port):
        process = _start(bare_cluster, tmp_path / "taken.log", port)
        try:
            assert process.wait(30) == 2
        finally:
            _stop(process, [])
    log = (tmp_path / "taken.log").read_text()
    assert f"configuration error: cannot listen on 127.0.0.1:{port}: already in use" in log
    assert "Traceback" not in log


@pytest.mark.timeout(60)
def test_a_taken_process_port_is_a_configuration_error(bare_cluster: Cluster, tmp_path: Path) -> None:
    """A child that cannot bind its own port ends the whole group with status 2, not a restart loop."""
    port, taken = free_port(), free_port()
    with socket_listening(taken):  # process 1's own port
        process = _start(bare_cluster, tmp_path / "own.log", port, DIALOGS_PROCESS_PORT=str(taken - 1))
        try:
            assert process.wait(30) == 2
        finally:
            _stop(process, [])
    assert "configuration error: cannot listen on 127.0.0.1:" in (tmp_path / "own.log").read_text()


@contextlib.contextmanager
def socket_listening(port: int) -> Iterator[None]:
    with socket.create_server(("127.0.0.1", port)):
        yield

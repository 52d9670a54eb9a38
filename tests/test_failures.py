"""When parts fail: only the dialogs that need the failed part see 503s, and recovery needs no restart."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import uuid

import asyncpg
import psutil
import pytest

from dialogs.aio import background
from dialogs.metastore import members
from dialogs.watch import MetadataWatcher
from dialogsctl.embedded import LocalPostgres
from dialogsctl.net import free_port
from proxy.appkeys import TOPOLOGY
from tests.support import Api, Cluster, metric


async def _peers_by_shard(cluster: Cluster, hub: str, each: int = 4) -> dict[str, list[str]]:
    """Register peers until the hub has ``each`` dialogs on both shards (keys are random)."""
    peers: dict[str, list[str]] = {"shard-1": [], "shard-2": []}
    for i in range(200):
        if min(len(p) for p in peers.values()) >= each:
            return peers
        peer = await cluster.api.register(f"Peer{i}")
        peers[await cluster.shard_of(hub, peer)].append(peer)
    raise AssertionError(f"200 peers did not give {each} dialogs on each shard: {peers}")


async def _eventually_ok(api: Api, token: str, peer: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reply = await api.send(token, peer, "after recovery")
        if reply.status == 200 or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert reply.status == 200, reply.body


async def test_stopped_shard_fails_only_its_dialogs_and_recovers(
    cluster: Cluster, running_servers: dict[str, LocalPostgres]
) -> None:
    """Shard-2's server stops: its dialogs 503 with Retry-After, shard-1's work; it comes back on its own."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(cluster, hub)
    on_1, on_2 = peers["shard-1"][0], peers["shard-2"][0]
    assert (await api.send(token, on_2, "before")).status == 200

    running_servers["shard-2"].stop()
    try:
        for reply in (await api.send(token, on_2, "during"), await api.list(token, on_2)):
            assert reply.status == 503, reply.body
            assert reply.headers["Retry-After"] == "1"
            assert reply.json["code"] == 50302
        assert (await api.send(token, on_1, "other shard")).status == 200
        assert [m["text"] for m in (await api.list(token, on_1)).json] == ["other shard"]
    finally:
        running_servers["shard-2"].start()

    await _eventually_ok(api, token, on_2)
    assert [m["text"] for m in (await api.list(token, on_2)).json] == ["after recovery", "before"]


async def test_crashed_workers_registration_is_skipped(cluster: Cluster) -> None:
    """A worker that died without deregistering (fresh row, closed port) costs no client an error."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(cluster, hub)
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        for shard_id in ("shard-1", "shard-2"):
            await members.upsert_worker(con, f"{shard_id}-dead", shard_id, f"http://127.0.0.1:{free_port()}", 1)
    finally:
        await con.close()
    await asyncio.sleep(0.5)  # the proxy's next poll sees the dead registrations
    for shard_peers in peers.values():
        for peer in shard_peers:
            assert (await api.send(token, peer, "still fine")).status == 200


async def test_shard_without_workers_is_503(bare_cluster: Cluster) -> None:
    """No live worker for a shard: its dialogs 503, the other shard's work."""
    await bare_cluster.start_worker("shard-1")
    await bare_cluster.start_worker("shard-2")
    await bare_cluster.start_proxy()
    api = bare_cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(bare_cluster, hub)
    shard_2_worker = next(name for name in bare_cluster.workers if name.startswith("shard-2@"))
    await bare_cluster.workers.pop(shard_2_worker).cleanup()
    await asyncio.sleep(0.5)
    reply = await api.send(token, peers["shard-2"][0], "nobody home")
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    assert (await api.send(token, peers["shard-1"][0], "fine")).status == 200


async def _second_shard_1_worker(cluster: Cluster) -> None:
    await cluster.start_worker("shard-1")
    topology = cluster.proxies[0].app[TOPOLOGY]
    for _ in range(100):
        if topology.worker_count("shard-1") == 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the proxy never saw the second shard-1 worker")


async def test_second_worker_takes_over(cluster: Cluster) -> None:
    """With two workers on a shard, one that stops answering (still registered) loses nothing."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(cluster, hub)
    await _second_shard_1_worker(cluster)
    first = next(name for name in cluster.workers if name.startswith("shard-1@"))
    await cluster.crash_worker(first)
    for peer in peers["shard-1"]:
        assert (await api.send(token, peer, "via the second worker")).status == 200
    # The crashed worker is still registered and heartbeating: the proxy routed around it.
    assert cluster.proxies[0].app[TOPOLOGY].worker_count("shard-1") == 2
    for peer in peers["shard-1"]:
        assert [m["text"] for m in (await api.list(token, peer)).json] == ["via the second worker"]


async def test_two_workers_over_a_down_shard_database_answer_503(
    cluster: Cluster, running_servers: dict[str, LocalPostgres]
) -> None:
    """Both workers of a shard answer 503 (database down): the client gets 503, never a 400."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(cluster, hub)
    await _second_shard_1_worker(cluster)
    peer = peers["shard-1"][0]
    running_servers["shard-1"].stop()
    try:
        for _ in range(4):  # round-robin: each worker is tried first at least once
            reply = await api.send(token, peer, "while the database is down", key=f"k-{uuid.uuid4()}")
            assert reply.status == 503, reply.body
            assert reply.json["code"] == 50302 and reply.headers["Retry-After"] == "1"
    finally:
        running_servers["shard-1"].start()
    await _eventually_ok(api, token, peer)
    assert [m["text"] for m in (await api.list(token, peer)).json] == ["after recovery"]


async def test_proxy_keeps_routing_while_metadata_is_down(
    cluster: Cluster, running_servers: dict[str, LocalPostgres]
) -> None:
    """Metadata down: sends and lists go on with the last map; login is 503 until it is back."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    peers = [await api.register(f"Peer{i}") for i in range(6)]

    running_servers["meta"].stop()
    try:
        await asyncio.sleep(0.5)  # watchers notice
        for peer in peers:
            assert (await api.send(anna_token, peer, "metadata is down")).status == 200
            assert (await api.list(anna_token, peer)).json[0]["text"] == "metadata is down"
        login = await api.request("POST", "/login", body={"id": anna, "password": "password-1"})
        assert login.status == 503 and login.json["code"] == 50303 and login.headers["Retry-After"] == "1"
        health = (await api.request("GET", "/health")).json
        assert health["metadata"] == "down" and health["map_version"] == 1
    finally:
        running_servers["meta"].start()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while (login := await api.request("POST", "/login", body={"id": anna, "password": "password-1"})).status != 200:
        assert loop.time() < deadline, login.body
        await asyncio.sleep(0.2)


async def test_unknown_recipient_is_let_through_while_metadata_is_down(
    cluster: Cluster, running_servers: dict[str, LocalPostgres]
) -> None:
    """A recipient the proxy has not seen cannot be checked without metadata: the send goes through."""
    api = cluster.api
    anna, token = await api.user("Anna")
    stranger = str(uuid.uuid4())
    running_servers["meta"].stop()
    try:
        assert (await api.send(token, stranger, "hello?")).status == 200
    finally:
        running_servers["meta"].start()


def _freeze(server: LocalPostgres, sig: signal.Signals) -> None:
    """Stop or resume every process of a PostgreSQL server: a stalled machine, connections open."""
    assert server.process is not None
    postmaster = psutil.Process(server.process.pid)
    for proc in [postmaster, *postmaster.children(recursive=True)]:
        proc.send_signal(sig)


@pytest.mark.parametrize("outage", ["restart", "stall"])
async def test_metadata_coming_back_costs_no_request(
    bare_cluster: Cluster, running_servers: dict[str, LocalPostgres], outage: str
) -> None:
    """Metadata down (or frozen, its connections open) for longer than the worker TTL, then
    back: no send fails as it returns."""
    cluster = bare_cluster
    for shard_id in ("shard-1", "shard-2"):
        # Heartbeats slow enough that the proxy reconnects and reloads before the next lands.
        await cluster.start_worker(shard_id, DIALOGS_HEARTBEAT_INTERVAL="5")
    await cluster.start_proxy(DIALOGS_WORKER_TTL="6")
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_by_shard(cluster, hub, each=2)
    targets = peers["shard-1"] + peers["shard-2"]
    meta = running_servers["meta"]
    if outage == "restart":
        meta.stop()
    else:
        _freeze(meta, signal.SIGSTOP)
    try:
        await asyncio.sleep(7)  # every heartbeat is older than the TTL now
    finally:
        if outage == "restart":
            meta.start()
        else:
            _freeze(meta, signal.SIGCONT)
    loop = asyncio.get_running_loop()
    deadline, failures, sent = loop.time() + 4, [], 0
    while loop.time() < deadline:
        replies = await asyncio.gather(*(api.send(token, peer, f"m{sent}") for peer in targets))
        failures += [reply.body for reply in replies if reply.status != 200]
        sent += 1
    assert not failures, failures[:3]
    assert sent > 10


async def test_watcher_survives_an_unexpected_error(databases: dict[str, str]) -> None:
    """A loader that raises something unforeseen is retried; the watcher reports itself down meanwhile."""
    calls: list[bool] = []

    async def load(con: asyncpg.Connection) -> None:
        calls.append(watcher.connected)
        if len(calls) == 1:
            raise KeyError("a bug in the loader")

    watcher = MetadataWatcher(databases["meta"], ["nothing"], load, poll_interval=0.05)
    async with background(watcher.run()):
        assert await watcher.wait_loaded(timeout=10)
        assert watcher.connected
    assert len(calls) >= 2
    assert calls[:2] == [False, False]  # not "up" before a load worked, nor after one failed


async def test_a_worker_whose_host_is_gone_costs_a_connect_timeout_not_an_error(cluster: Cluster) -> None:
    """A registered worker whose address answers nothing (a killed container's: its SYNs go
    unanswered) is "never connected", not "broken": after the connect timeout (1 s) the
    send goes to the shard's other worker, and no client sees a 503."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peer = (await _peers_by_shard(cluster, hub, each=1))["shard-1"][0]
    hole = socket.socket()  # accepts nothing: its one-connection queue is filled below
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(hole.getsockname())
        fillers.append(filler)
    stop = asyncio.Event()

    async def registered_as_a_worker() -> None:
        con = await asyncpg.connect(cluster.metadata_dsn)
        try:
            while not stop.is_set():
                await members.upsert_worker(con, "gone", "shard-1", f"http://127.0.0.1:{hole.getsockname()[1]}", 1)
                await asyncio.sleep(0.3)
        finally:
            await con.close()

    proxy = cluster.proxies[0]
    try:
        async with background(registered_as_a_worker()):
            for _ in range(100):
                if proxy.app[TOPOLOGY].worker_count("shard-1") == 2:
                    break
                await asyncio.sleep(0.05)
            assert proxy.app[TOPOLOGY].worker_count("shard-1") == 2
            before = metric(proxy, "dialogs_proxy_forward_errors_total", shard_id="shard-1", reason="connect")
            statuses = []
            for number in range(12):  # round-robin: the gone worker comes first now and then
                statuses.append((await api.send(token, peer, f"m{number}")).status)
                if metric(proxy, "dialogs_proxy_forward_errors_total", shard_id="shard-1", reason="connect") > before:
                    break
            stop.set()
    finally:
        for sock in [hole, *fillers]:
            sock.close()
    assert metric(proxy, "dialogs_proxy_forward_errors_total", shard_id="shard-1", reason="connect") > before
    assert set(statuses) == {200}, statuses
    assert len((await api.list(token, peer)).json) == len(statuses)

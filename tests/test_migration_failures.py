"""Migrations that are aborted, crash, or meet a proxy with an old map: the invariants still hold."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.appkeys import TOPOLOGY
from tests.support import Cluster, metric
from tests.traffic import Traffic, check_every_dialog, check_placement, make_dialogs

pytestmark = pytest.mark.timeout(180)


async def _phase(cluster: Cluster, migration_id: int) -> dict[str, object]:
    return (await cluster.admin("GET", f"/admin/migrations/{migration_id}")).json


async def _until(predicate, timeout: float = 30.0, interval: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


class Runners:
    """`dialogs run-migration` processes, killed at teardown if a test left one running."""

    def __init__(self, metadata_dsn: str) -> None:
        self.env = {**os.environ, "DIALOGS_METADATA_DSN": metadata_dsn}
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.migration"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
async def runners(bare_cluster: Cluster) -> AsyncIterator[Runners]:
    runners = Runners(bare_cluster.metadata_dsn)
    try:
        yield runners
    finally:
        runners.cleanup()


async def _busy_cluster(cluster: Cluster, driver: bool) -> tuple[Traffic, asyncio.Event, asyncio.Future[None]]:
    flag = "true" if driver else "false"
    await cluster.start_three_shards(DIALOGS_MIGRATION_DRIVER=flag)
    await cluster.start_proxy(DIALOGS_MIGRATION_DRIVER=flag)
    dialogs = await make_dialogs(cluster)
    traffic = Traffic([cluster.api_for(0), cluster.api_for(1)], dialogs)
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    await asyncio.sleep(1.5)
    return traffic, stop, load


async def _finish(cluster: Cluster, traffic: Traffic, stop: asyncio.Event, load: asyncio.Future[None]) -> None:
    await asyncio.sleep(0.5)
    stop.set()
    await load
    assert traffic.failures == []
    assert traffic.violations == []
    total = await check_every_dialog(cluster, traffic.dialogs)
    await check_placement(cluster, ["shard-1", "shard-2", "shard-3"], total)


async def test_runner_killed_in_copy_resumes(bare_cluster: Cluster, runners: Runners) -> None:
    """kill -9 of the runner mid-copy: a new runner resumes from the checkpoints; nothing lost or doubled."""
    cluster = bare_cluster
    traffic, stop, load = await _busy_cluster(cluster, driver=False)
    try:
        # Enough rows that the copy takes several throttled batches (2 s each), whatever
        # the machine's speed: the kill must land between two of them.
        async def enough() -> bool:
            return sum(len(d.acked) for d in traffic.dialogs) >= 900

        await _until(enough, timeout=60, interval=0.1)
        started = await cluster.admin(
            "POST",
            "/admin/shards",
            {
                "shard_id": "shard-3",
                "dsn": cluster.spare_dsns["shard-3"],
                "rows_per_second": 50,
                "batch_size": 100,
            },
        )
        migration_id = started.json["migration_id"]
        first = runners.start()

        async def copying() -> bool:
            m = await _phase(cluster, migration_id)
            return m["phase"] == "copy" and m["rows_copied"] > 0

        await _until(copying)
        first.send_signal(signal.SIGKILL)
        first.wait()
        interrupted = await _phase(cluster, migration_id)
        assert interrupted["phase"] == "copy"
        await cluster.admin("PATCH", f"/admin/migrations/{migration_id}", {"rows_per_second": 0})
        runners.start()
        done = await cluster.wait_migration(migration_id)
        assert done["phase"] == "done", done
        assert done["rows_copied"] >= interrupted["rows_copied"]
    finally:
        stop.set()
    await _finish(cluster, traffic, stop, load)


async def test_runner_killed_in_cutover_resumes(bare_cluster: Cluster, runners: Runners) -> None:
    """kill -9 of the runner while its hand-over waits: sources have stopped serving, the map has not
    flipped; a new runner redoes the cutover and no client sees an error."""
    cluster = bare_cluster
    traffic, stop, load = await _busy_cluster(cluster, driver=False)
    blocker = await asyncpg.connect(cluster.spare_dsns["shard-3"])
    monitor = await asyncpg.connect(cluster.spare_dsns["shard-3"])
    try:
        started = await cluster.admin(
            "POST",
            "/admin/shards",
            {
                "shard_id": "shard-3",
                "dsn": cluster.spare_dsns["shard-3"],
                "rows_per_second": 400,
                "batch_size": 100,
            },
        )
        migration_id = started.json["migration_id"]
        first = runners.start()

        async def prepared() -> bool:
            return (await _phase(cluster, migration_id))["phase"] not in ("prepare",)

        await _until(prepared)
        # Hold the target's incoming ranges: the runner's hand-over (incoming -> owned) must wait.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM shard_ranges WHERE state = 'incoming' FOR UPDATE")

        async def handing_over() -> bool:
            # From another connection: inside the blocker's transaction, pg_stat_activity
            # would keep showing its first snapshot.
            waiting = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%set_range_states%'"
            )
            return waiting > 0

        await _until(handing_over)
        assert (await _phase(cluster, migration_id))["phase"] == "cutover"
        first.send_signal(signal.SIGKILL)
        first.wait()
        await transaction.rollback()
        runners.start()
        done = await cluster.wait_migration(migration_id)
        assert done["phase"] == "done", done
    finally:
        await blocker.close()
        await monitor.close()
        stop.set()
    await _finish(cluster, traffic, stop, load)


async def test_abort_before_flip_restores_the_old_state(bare_cluster: Cluster) -> None:
    """An aborted migration leaves map 1 active, sources owning everything, and nothing on the target."""
    cluster = bare_cluster
    traffic, stop, load = await _busy_cluster(cluster, driver=True)
    try:
        started = await cluster.admin(
            "POST",
            "/admin/shards",
            {
                "shard_id": "shard-3",
                "dsn": cluster.spare_dsns["shard-3"],
                "rows_per_second": 100,
                "batch_size": 100,
            },
        )
        migration_id = started.json["migration_id"]

        async def copying() -> bool:
            m = await _phase(cluster, migration_id)
            return m["phase"] == "copy" and m["rows_copied"] > 0

        await _until(copying)
        aborted = await cluster.admin("POST", f"/admin/migrations/{migration_id}/abort")
        assert aborted.status == 202 and aborted.json["abort_requested"]
        final = await cluster.wait_migration(migration_id)
        assert final["phase"] == "aborted" and "aborted by the operator" in final["error"]
        again = await cluster.admin("POST", f"/admin/migrations/{migration_id}/abort")
        assert again.status == 409
    finally:
        stop.set()
    await load
    assert traffic.failures == [] and traffic.violations == []
    assert (await cluster.admin("GET", "/admin/map")).json["map_version"] == 1
    assert (await cluster.shard_fetch("shard-3", "SELECT count(*) FROM messages"))[0][0] == 0
    assert (await cluster.shard_fetch("shard-3", "SELECT count(*) FROM shard_ranges"))[0][0] == 0
    for shard_id in ("shard-1", "shard-2"):
        states = await cluster.shard_fetch(shard_id, "SELECT DISTINCT state FROM shard_ranges")
        assert [row["state"] for row in states] == ["owned"]
    total = await check_every_dialog(cluster, traffic.dialogs)
    await check_placement(cluster, ["shard-1", "shard-2", "shard-3"], total)


async def test_proxy_with_an_old_map_cannot_write_a_moved_range(bare_cluster: Cluster) -> None:
    """After a move, a proxy still on map 1 is refused by the old shard, reloads, and writes to the new one."""
    cluster = bare_cluster
    await cluster.start_three_shards()
    api = cluster.api
    anna, token = await api.user("Anna")
    topology = cluster.proxies[0].app[TOPOLOGY]
    old_map = topology.map
    assert old_map is not None
    new_map = old_map.with_shard("shard-3")
    peer, key = await api.peer_whose_dialog_goes_to(anna, new_map, "shard-3")  # its dialog with Anna moves
    source = old_map.owner(key)
    assert (await api.send(token, peer, "before the move")).status == 200
    started = await cluster.admin(
        "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
    )
    assert (await cluster.wait_migration(started.json["migration_id"]))["phase"] == "done"

    # The shard database itself refuses the write, whatever routed it there.
    lo, hi = sorted((uuid.UUID(anna), uuid.UUID(peer)))
    refused = await cluster.shard_fetch(
        source,
        "SELECT status FROM store_messages($1, $2, $3, $4, $5, $6)",
        [key],
        [lo],
        [hi],
        [True],
        ["forged"],
        [None],
    )
    assert refused[0]["status"] == "not_served"

    topology.map = old_map  # this proxy has not heard of the move
    retries = metric(cluster.proxies[0], "dialogs_proxy_stale_map_retries_total")
    reply = await api.send(token, peer, "routed with map 1")
    assert reply.status == 200
    assert metric(cluster.proxies[0], "dialogs_proxy_stale_map_retries_total") > retries
    assert topology.map_version == 2
    on_target = await cluster.shard_fetch("shard-3", "SELECT text FROM messages WHERE dialog_key = $1 ORDER BY id", key)
    assert [row["text"] for row in on_target] == ["before the move", "routed with map 1"]
    on_source = await cluster.shard_fetch(source, "SELECT count(*) FROM messages WHERE dialog_key = $1", key)
    assert on_source[0][0] == 0
    assert (await cluster.active_map()).owner(key) == "shard-3"


async def test_cutover_past_its_deadline_gives_the_ranges_back(bare_cluster: Cluster) -> None:
    """A cutover that cannot finish within its deadline gives the ranges back to their old
    owner (writable again), counts the attempt, and a later attempt completes; no client
    sees an error."""
    cluster = bare_cluster
    await cluster.start_three_shards(DIALOGS_CUTOVER_DEADLINE="1")
    await cluster.start_proxy(DIALOGS_MIGRATION_DRIVER="false")
    traffic = Traffic([cluster.api_for(0), cluster.api_for(1)], await make_dialogs(cluster))
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    blocker = await asyncpg.connect(cluster.spare_dsns["shard-3"])
    monitor = await asyncpg.connect(cluster.spare_dsns["shard-3"])
    try:
        await asyncio.sleep(1.0)
        started = await cluster.admin(
            "POST",
            "/admin/shards",
            {
                "shard_id": "shard-3",
                "dsn": cluster.spare_dsns["shard-3"],
                "rows_per_second": 400,
                "batch_size": 100,
            },
        )
        migration_id = started.json["migration_id"]

        async def prepared() -> bool:
            return (await _phase(cluster, migration_id))["phase"] != "prepare"

        await _until(prepared)
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM shard_ranges WHERE state = 'incoming' FOR UPDATE")

        async def handing_over() -> bool:
            return (
                await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%set_range_states%'"
                )
                > 0
            )

        await _until(handing_over)
        await asyncio.sleep(1.5)  # past the 1 s deadline: the runner gives the ranges back
        await transaction.rollback()
        done = await cluster.wait_migration(migration_id)
        assert done["phase"] == "done", done
        assert done["cutover_attempts"] >= 1
    finally:
        await blocker.close()
        await monitor.close()
        stop.set()
    await load
    assert traffic.failures == [] and traffic.violations == []
    total = await check_every_dialog(cluster, traffic.dialogs)
    await check_placement(cluster, ["shard-1", "shard-2", "shard-3"], total)


async def test_remove_then_add_back(bare_cluster: Cluster) -> None:
    """shard-3 joins, leaves, and joins again with the same database; every message stays readable."""
    cluster = bare_cluster
    await cluster.start_three_shards()
    api = cluster.api
    anna, token = await api.user("Anna")
    peers = [await api.register(f"P{i}") for i in range(30)]
    for peer in peers:
        assert (await api.send(token, peer, "hello")).status == 200
    dsn = cluster.spare_dsns["shard-3"]
    for method, path, body in [
        ("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": dsn}),
        ("DELETE", "/admin/shards/shard-3", None),
        ("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": dsn}),
    ]:
        started = await cluster.admin(method, path, body)
        assert started.status == 202, started.body
        result = await cluster.wait_migration(started.json["migration_id"])
        assert result["phase"] == "done", result
        for peer in peers:
            assert [m["text"] for m in (await api.list(token, peer)).json] == ["hello"]


@pytest.mark.parametrize("written", [False, True], ids=["quiet-dialog", "dialog-written-throughout"])
async def test_a_target_that_lost_a_row_aborts_the_migration(bare_cluster: Cluster, written: bool) -> None:
    """A row missing on the target is caught before the flip, whether its dialog is quiet or
    written to all through pre-verification (whose shortcuts excuse dialogs written past a
    head from the whole-range check: they must still be checked one by one). The migration
    aborts; the source kept every message."""
    cluster = bare_cluster
    for shard_id in ("shard-1", "shard-2"):
        await cluster.start_worker(shard_id)
    await cluster.start_proxy()
    api = cluster.api
    anna, token = await api.user("Anna")
    topology = cluster.proxies[0].app[TOPOLOGY]
    assert topology.map is not None
    new_map = topology.map.with_shard("shard-3")
    peer, key = await api.peer_whose_dialog_goes_to(anna, new_map, "shard-3")  # its dialog with Anna moves
    sent = [f"old {n}" for n in range(5)]
    for text in sent:
        assert (await api.send(token, peer, text)).status == 200

    # No worker on shard-3 yet: the runner copies, then waits in catch-up for one.
    started = await cluster.admin(
        "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
    )
    migration_id = started.json["migration_id"]

    async def copied() -> bool:
        return (await _phase(cluster, migration_id))["phase"] == "catchup"

    await _until(copied)
    deleted = await cluster.shard_fetch(
        "shard-3",
        "DELETE FROM messages WHERE dialog_key = $1 AND id = (SELECT min(id) FROM messages"
        " WHERE dialog_key = $1) RETURNING text",
        key,
    )
    assert [row["text"] for row in deleted] == ["old 0"]

    stop = asyncio.Event()

    async def keep_writing() -> None:
        number = 0
        while not stop.is_set():
            reply = await api.send(token, peer, f"new {number}")
            assert reply.status == 200, reply.body
            sent.append(f"new {number}")
            number += 1
            await asyncio.sleep(0.005)

    writer = asyncio.ensure_future(keep_writing()) if written else None
    try:
        await cluster.start_worker("shard-3")
        result = await cluster.wait_migration(migration_id)
    finally:
        stop.set()
        if writer is not None:
            await writer
    assert result["phase"] == "aborted", result
    assert "differ" in result["error"], result
    assert (await cluster.active_map()).owner(key) != "shard-3"
    texts = [m["text"] for m in await api.whole_dialog(token, peer)]
    assert texts == list(reversed(sent))

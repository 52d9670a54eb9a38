"""A worker started before its shard is ready: it waits for the server and for the shard's
registration, without errors in anyone's log, and serves once both are there."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dialog_api.storage import upgrade_schema
from dialogsctl.embedded import LocalPostgres
from tests.support import Cluster, metric


async def test_the_first_schema_upgrade_waits_for_a_starting_server(
    bare_cluster: Cluster,
    running_servers: dict[str, LocalPostgres],
) -> None:
    """A shard server that is down when its worker starts (compose starts them together):
    the schema upgrade retries until it is up, instead of the worker exiting."""
    server = running_servers["shard-3"]
    server.stop()
    upgrade = asyncio.ensure_future(upgrade_schema(bare_cluster.spare_dsns["shard-3"], patience=60))
    await asyncio.sleep(2)
    assert not upgrade.done()
    server.start()  # on this thread: the server dies with the thread that started it (PR_SET_PDEATHSIG)
    applied = await asyncio.wait_for(upgrade, 30)
    assert "0001_init.sql" in applied


async def test_a_server_that_never_comes_is_an_error_in_time(bare_cluster: Cluster) -> None:
    """Past its patience, the upgrade fails (the worker exits and is restarted by its supervisor)."""
    with pytest.raises(OSError):
        await upgrade_schema("postgresql://postgres:x@127.0.0.1:9/dialogs", patience=1.5)


async def test_a_worker_waits_for_its_shard_to_be_registered(
    bare_cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker of shard-3 before `shard add` registers it: no registration row and no failed
    insert (so no foreign-key error in the metadata server's log), one line saying it waits;
    once the shard is added, the worker registers and takes its traffic."""
    cluster = bare_cluster
    caplog.set_level(logging.INFO)
    await cluster.start_three_shards()
    await asyncio.sleep(1.0)  # several heartbeats
    assert await cluster.fetch_meta("SELECT count(*) FROM workers WHERE shard_id = 'shard-3'") == 0
    waiting = [r for r in caplog.records if "shard shard-3 is not registered yet" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO
    assert "foreign key" not in caplog.text
    started = await cluster.admin(
        "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
    )
    assert (await cluster.wait_migration(started.json["migration_id"]))["phase"] == "done"
    assert await cluster.fetch_meta("SELECT count(*) FROM workers WHERE shard_id = 'shard-3'") == 1
    assert metric(cluster.proxies[0], "dialogs_shard_live_workers", shard_id="shard-3") == 1


async def test_live_workers_per_shard_show_a_shard_going_down(cluster: Cluster) -> None:
    """dialogs_shard_live_workers{shard_id} (what the alerts watch) counts the workers a proxy
    routes to, and drops to 0 when a shard's only worker stops answering."""
    proxy = cluster.proxies[0]
    assert metric(proxy, "dialogs_shard_live_workers", shard_id="shard-1") == 1
    assert metric(proxy, "dialogs_shard_live_workers", shard_id="shard-2") == 1
    await cluster.start_worker("shard-1")
    await cluster.wait_routable(0)

    async def count(shard_id: str, expected: float) -> None:
        for _ in range(200):
            if metric(proxy, "dialogs_shard_live_workers", shard_id=shard_id) == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{shard_id} never showed {expected} live workers")

    await count("shard-1", 2)
    for name in [n for n in cluster.workers if n.startswith("shard-2@")]:
        await cluster.workers.pop(name).cleanup()  # leaves its registration: gone from routing by its TTL
    await count("shard-2", 0)

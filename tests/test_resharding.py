"""Online resharding under continuous traffic through two proxies: the brief's invariants."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import Cluster, metric
from tests.traffic import Traffic, check_every_dialog, check_inbox_recount, check_inboxes, check_placement, make_dialogs

pytestmark = pytest.mark.timeout(180)


async def two_proxy_cluster(cluster: Cluster) -> None:
    for shard_id in ("shard-1", "shard-2"):
        await cluster.start_worker(shard_id)
    await cluster.start_proxy()
    await cluster.start_proxy()


async def test_add_then_remove_a_shard_under_load(bare_cluster: Cluster) -> None:
    """Add shard-3, then remove shard-1, while 6 senders and 3 readers use two proxies: nothing lost,
    duplicated, reordered or missed, no request failed, rows end where the final ring says."""
    cluster = bare_cluster
    await two_proxy_cluster(cluster)
    dialogs = await make_dialogs(cluster)
    traffic = Traffic([cluster.api_for(0), cluster.api_for(1)], dialogs)
    # Dialogs nobody touches while the shards change: their users' inbox rows reach their new
    # shards only by the migrations' copies (traffic re-projects the others' anyway).
    quiet = await make_dialogs(cluster, people=12, count=16)
    for dialog in quiet:
        sent = await cluster.api.send(dialog.sender_token, dialog.recipient, "before the migrations")
        assert sent.status == 200, sent.body
        dialog.acked.append((sent.json["id"], "before the migrations"))
    # Inboxes before: a first second of traffic, then the recount finds every inbox right.
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    await asyncio.sleep(1.0)
    stop.set()
    await load
    await check_inbox_recount(cluster)
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    try:
        await asyncio.sleep(1.0)
        await cluster.start_worker("shard-3")
        added = await cluster.admin(
            "POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]}
        )
        assert added.status == 202, added.body
        assert added.json["kind"] == "add" and added.json["to_version"] == 2
        first = await cluster.wait_migration(added.json["migration_id"])
        assert first["phase"] == "done", first
        await asyncio.sleep(1.0)

        removed = await cluster.admin("DELETE", "/admin/shards/shard-1", index=1)
        assert removed.status == 202, removed.body
        second = await cluster.wait_migration(removed.json["migration_id"])
        assert second["phase"] == "done", second
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load

    assert traffic.failures == []
    assert traffic.violations == []
    assert traffic.reads > 50
    for migration in (first, second):
        assert migration["rows_copied"] > 0 and migration["ranges_copied"] == migration["ranges_total"]
        assert migration["last_pause_ms"] is not None and migration["last_pause_ms"] < 5000
    total = await check_every_dialog(cluster, dialogs + quiet)
    assert total > 500
    assert total == sum(len(d.acked) for d in dialogs + quiet)
    await check_placement(cluster, ["shard-1", "shard-2", "shard-3"], total)  # inboxes recounted too
    await check_inboxes(cluster.api, dialogs + quiet)
    shard_map = (await cluster.admin("GET", "/admin/map")).json
    assert shard_map["map_version"] == 3
    assert [s["shard_id"] for s in shard_map["shards"]] == ["shard-2", "shard-3"]
    waits = sum(metric(proxy, "dialogs_proxy_buffer_wait_seconds_sum") for proxy in cluster.proxies)
    print(
        f"\nacked {total} messages, {traffic.reads} reads; pauses {first['last_pause_ms']:.1f} ms and"
        f" {second['last_pause_ms']:.1f} ms; total buffered wait {waits:.3f} s"
    )

"""Online resharding under continuous traffic through two proxies: the brief's invariants."""

from __future__ import annotations

import asyncio
import random

import pytest

from dialogs.keys import dialog_key
from proxy.appkeys import METRICS
from tests.support import Cluster
from tests.traffic import Dialog, Traffic

pytestmark = pytest.mark.timeout(180)


async def two_proxy_cluster(cluster: Cluster) -> None:
    for shard_id in ("shard-1", "shard-2"):
        await cluster.start_worker(shard_id)
    await cluster.start_proxy()
    await cluster.start_proxy()


async def make_dialogs(cluster: Cluster, people: int = 24, count: int = 30) -> list[Dialog]:
    users = [await cluster.api.user(f"User{i}") for i in range(people)]
    rng = random.Random(11)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        a, b = rng.sample(range(people), 2)
        if (b, a) not in pairs:
            pairs.add((a, b))
    return [Dialog(users[a][0], users[a][1], users[b][0], users[b][1]) for a, b in sorted(pairs)]


async def check_every_dialog(cluster: Cluster, dialogs: list[Dialog]) -> int:
    """Every acknowledged message readable exactly once, in order, from both participants."""
    total = 0
    for dialog in dialogs:
        expected = [text for _, text in reversed(dialog.acked)]
        expected_ids = [message_id for message_id, _ in reversed(dialog.acked)]
        for token, other in ((dialog.sender_token, dialog.recipient), (dialog.recipient_token, dialog.sender)):
            listed = await cluster.api.whole_dialog(token, other, page=500)
            assert [m["text"] for m in listed] == expected
            assert [m["id"] for m in listed] == expected_ids
        total += len(expected)
    return total


async def check_placement(cluster: Cluster, shard_ids: list[str], total: int) -> None:
    """Rows are exactly where the active ring says, and nowhere else."""
    active = await cluster.active_map()
    seen = 0
    for shard_id in shard_ids:
        rows = await cluster.shard_fetch(shard_id, "SELECT dialog_key, user_lo, user_hi FROM messages")
        for row in rows:
            assert row["dialog_key"] == dialog_key(row["user_lo"], row["user_hi"])
            assert active.owner(row["dialog_key"]) == shard_id, f"a row of {active.owner(row['dialog_key'])} is on {shard_id}"
        seen += len(rows)
        leftovers = await cluster.shard_fetch(shard_id, "SELECT count(*) FROM migration_delta")
        assert leftovers[0][0] == 0
    assert seen == total


async def test_add_then_remove_a_shard_under_load(bare_cluster: Cluster) -> None:
    """Add shard-3, then remove shard-1, while 6 senders and 3 readers use two proxies: nothing lost,
    duplicated, reordered or missed, no request failed, rows end where the final ring says."""
    cluster = bare_cluster
    await two_proxy_cluster(cluster)
    dialogs = await make_dialogs(cluster)
    traffic = Traffic([cluster.api_for(0), cluster.api_for(1)], dialogs)
    stop = asyncio.Event()
    load = asyncio.ensure_future(traffic.run(stop))
    try:
        await asyncio.sleep(1.5)
        await cluster.start_worker("shard-3")
        added = await cluster.admin("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"]})
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
    total = await check_every_dialog(cluster, dialogs)
    assert total > 500
    assert total == sum(len(d.acked) for d in dialogs)
    await check_placement(cluster, ["shard-1", "shard-2", "shard-3"], total)
    shard_map = (await cluster.admin("GET", "/admin/map")).json
    assert shard_map["map_version"] == 3
    assert [s["shard_id"] for s in shard_map["shards"]] == ["shard-2", "shard-3"]
    waits = sum(proxy.app[METRICS].buffer_wait_seconds._sum.get() for proxy in cluster.proxies)
    print(f"\nacked {total} messages, {traffic.reads} reads; pauses {first['last_pause_ms']:.1f} ms and"
          f" {second['last_pause_ms']:.1f} ms; total buffered wait {waits:.3f} s")

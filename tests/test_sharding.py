"""Dialogs land on the shard the ring names, spread over shards, and are read by index."""

from __future__ import annotations

import asyncio
import uuid

from dialog_api.app import _PLANS
from dialog_api.storage import LIST_PAGES_QUERY, ordered
from dialogs import pg
from dialogs.keys import dialog_key
from tests.support import Cluster


async def test_messages_live_on_the_shard_the_ring_names(cluster: Cluster) -> None:
    """Each dialog's rows are on its ring owner only, and 20 dialogs use both shards."""
    api = cluster.api
    hub, hub_token = await api.user("Hub")
    peers = [await api.register(f"Peer{i}") for i in range(20)]
    for peer in peers:
        assert (await api.send(hub_token, peer, f"hello {peer}")).status == 200

    owners = {peer: await cluster.shard_of(hub, peer) for peer in peers}
    assert set(owners.values()) == {"shard-1", "shard-2"}
    for shard_id in cluster.shard_dsns:
        rows = await cluster.shard_fetch(shard_id, "SELECT dialog_key, user_lo, user_hi, text FROM messages")
        expected = {peer for peer, owner in owners.items() if owner == shard_id}
        peers_here = {str(r["user_hi"] if str(r["user_lo"]) == hub else r["user_lo"]) for r in rows}
        assert peers_here == expected
        for row in rows:
            assert row["dialog_key"] == dialog_key(row["user_lo"], row["user_hi"])
            assert hub in (str(row["user_lo"]), str(row["user_hi"]))


# The query the worker runs for a batch of lists (dialog_api/storage.py): each page behind
# the range-ownership check, with the pair ordered as stored; planned as the worker's
# connections plan it (a generic plan, dialog_api/app.py).
_LIST_PLAN = "EXPLAIN " + LIST_PAGES_QUERY


async def test_list_query_is_served_by_the_primary_key(cluster: Cluster) -> None:
    """Among 50,000 messages: a short dialog is an index lookup, a long one a backward index scan."""
    api = cluster.api
    anna, token = await api.user("Anna")
    boris = await api.register("Boris")
    carl = await api.register("Carl")
    await asyncio.gather(*(api.send(token, boris, f"m{i}") for i in range(10)))
    await asyncio.gather(*(api.send(token, carl, f"m{i}") for i in range(10)))
    long_key = dialog_key(uuid.UUID(anna), uuid.UUID(carl))
    shard_id = await cluster.shard_of(anna, boris)
    # Filler for 5,000 other dialogs, so the planner sees a table where a scan would cost.
    await cluster.shard_fetch(
        shard_id,
        "INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)"
        " SELECT (g % 5000)::bigint * 1000003, u, u, g, true, 'filler', now()"
        " FROM generate_series(1, 50000) AS g, gen_random_uuid() AS u",
    )
    # And one long dialog of 5,000 messages.
    await cluster.shard_fetch(
        shard_id,
        "INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)"
        " SELECT $1, $2, $3, g, true, 'long', now() FROM generate_series(1, 5000) AS g",
        long_key,
        *ordered(uuid.UUID(anna), uuid.UUID(carl)),
    )
    await cluster.shard_fetch(shard_id, "ANALYZE messages")

    async def plan(other: str) -> str:
        key = dialog_key(uuid.UUID(anna), uuid.UUID(other))
        low, high = ordered(uuid.UUID(anna), uuid.UUID(other))
        con = await pg.connect(cluster.dsn(shard_id), server_settings=_PLANS)
        try:
            rows = await con.fetch(_LIST_PLAN, [key], [low], [high], [2**63 - 1], [100], 1 << 20)
        finally:
            await con.close()
        return "\n".join(row[0] for row in rows)

    short = await plan(boris)
    assert "messages_pkey" in short and "Seq Scan on messages" not in short, short
    long = await plan(carl)
    assert "Index Scan Backward using messages_pkey" in long, long
    # The only sort puts the batch's pages in the order of its queries; none sorts messages.
    sort_keys = [line.strip() for line in long.splitlines() if "Sort Key:" in line]
    assert sort_keys == ["Sort Key: q.i"] and "Seq Scan on messages" not in long, long

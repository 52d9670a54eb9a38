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
# connections plan it: prepared once, then the generic plan (dialog_api/app.py) for any
# dialog. (An EXPLAIN with bound values would plan for those values instead.)
_PREPARE_LIST = "PREPARE list_pages (bigint[], uuid[], uuid[], bigint[], integer[], bigint) AS " + LIST_PAGES_QUERY


async def test_list_query_is_served_by_the_primary_key(cluster: Cluster) -> None:
    """Among 55,000 messages, the worker's generic plan for a batch of lists reads each page
    backwards off the primary key, for a short dialog and a long one alike: no scan of the
    table and no sort of messages."""
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

    con = await pg.connect(cluster.dsn(shard_id), server_settings=_PLANS)
    try:
        await con.execute(_PREPARE_LIST)
        for other in (boris, carl):
            key = dialog_key(uuid.UUID(anna), uuid.UUID(other))
            low, high = ordered(uuid.UUID(anna), uuid.UUID(other))
            values = f"'{{{key}}}', '{{{low}}}', '{{{high}}}', '{{{2**63 - 1}}}', '{{100}}', 1048576"
            rows = await con.fetch(f"EXPLAIN (VERBOSE) EXECUTE list_pages({values})")
            plan = "\n".join(row[0] for row in rows)
            assert "Index Scan Backward using messages_pkey on" in plan, plan
            # The only sort puts the batch's pages in the order of its queries; none sorts messages.
            sort_keys = [line.strip() for line in plan.splitlines() if "Sort Key:" in line]
            assert sort_keys == ["Sort Key: q.i"] and "Seq Scan on messages" not in plan, plan
            assert "unnest($1)" in plan, plan  # planned for any batch, not for this one's values
    finally:
        await con.close()


async def test_a_copy_step_reads_its_range_off_the_index_on_a_large_table(databases: dict[str, str]) -> None:
    """A migration's copy step (shard_sql.copy_query: ranges given as arrays, a cursor
    window) reads its range off the primary key in the runner's sessions
    (runner.SHARD_SESSION), where the planner left to itself scans the whole table: found
    adding a shard over 10,000,000 messages per shard, every 5,000-row step read them all."""
    import asyncpg

    from dialogs import schema
    from dialogs.keys import INT64_MAX, INT64_MIN
    from dialogs.migration_plan import Span
    from proxy.migration import shard_sql
    from proxy.migration.runner import SHARD_SESSION

    setup = await asyncpg.connect(databases["shard-1"])
    try:
        await schema.upgrade_shard(setup)
        # 200,000 messages in 2,000 dialogs spread over the key space.
        await setup.execute(
            "INSERT INTO messages (dialog_key, user_lo, user_hi, id, from_lo, text, created_at)"
            " SELECT (d * 4611686018427387)::bigint - 4611686018427387000, u, u, g, true, repeat('x', 80), now()"
            " FROM generate_series(1, 2000) AS d, LATERAL (SELECT gen_random_uuid() AS u OFFSET 0) AS pair,"
            " generate_series(1, 100) AS g"
        )
        await setup.execute("ANALYZE messages")
        span = Span(-(2**62), -(2**62) + 2**56)  # about 16 dialogs' worth of the key space
        first = await setup.fetchrow(
            "SELECT dialog_key, user_lo, user_hi, id FROM messages WHERE dialog_key BETWEEN $1 AND $2"
            " ORDER BY dialog_key, user_lo, user_hi, id LIMIT 1",
            span.lo,
            span.hi,
        )
        assert first is not None
        after = (first[0], first[1], first[2], first[3])
        steps = {
            "a step of one range": shard_sql.copy_query([span], after, None),
            "small ranges together": shard_sql.copy_query(
                [span, Span(2**60, 2**60 + 2**55), Span(INT64_MAX - 5, INT64_MAX)]
            ),
            "the first range": shard_sql.copy_query([Span(INT64_MIN, INT64_MIN + 2**56)]),
        }
    finally:
        await setup.close()
    # A planner that finds random reads dear, as it did for 10,000,000 rows, here on 200,000.
    con = await asyncpg.connect(databases["shard-1"], server_settings={**SHARD_SESSION, "random_page_cost": "40"})
    try:
        for name, (query, args) in steps.items():
            plan = "\n".join(row[0] for row in await con.fetch("EXPLAIN " + query, *args))
            assert "messages_pkey" in plan and "Seq Scan on messages" not in plan, f"{name}:\n{plan}"
    finally:
        await con.close()

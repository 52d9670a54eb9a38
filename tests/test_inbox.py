"""The inbox: `GET /dialogs` and `GET /dialogs/unread`, kept by the outbox and its applier
across real shards (docs/inbox.md)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from dialogs.keys import user_key
from dialogsctl.net import free_port
from tests.support import Cluster, metric


def _summary(items: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Each conversation as (other user, last text, unread), in the inbox's order."""
    return [(item["user_id"], item["last_message"]["text"], item["unread"]) for item in items]


async def test_conversations_newest_first_with_unread_counts_and_a_badge(cluster: Cluster) -> None:
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    carol, carol_token = await api.user("Carol")
    await api.send(anna_token, boris, "hi Boris")
    await api.send(boris_token, anna, "hi Anna")
    await api.send(boris_token, anna, "how are you?")
    last = (await api.send(carol_token, anna, "it's Carol")).json

    expected = [(carol, "it's Carol", 1), (boris, "how are you?", 2)]
    items, totals = await api.settled_inbox(anna_token, lambda items, totals: _summary(items) == expected)
    assert _summary(items) == expected
    assert totals == {"total": 3, "dialogs": 2}
    # The item's last message is the message as the dialog's list shows it.
    newest = (await api.list(anna_token, carol, limit=1)).json[0]
    assert items[0]["last_message"] == newest and newest["id"] == last["id"]
    # Boris's own message is last in his inbox, and it is not unread for him.
    items, totals = await api.settled_inbox(
        boris_token, lambda items, totals: _summary(items) == [(anna, "how are you?", 1)]
    )
    assert _summary(items) == [(anna, "how are you?", 1)] and totals == {"total": 1, "dialogs": 1}
    assert items[0]["last_message"]["from"] == boris and items[0]["last_message"]["to"] == anna

    # Reading moves the counts; a conversation with new activity moves to the top.
    await api.read(anna_token, boris)
    await api.send(anna_token, boris, "fine, thanks")
    expected = [(boris, "fine, thanks", 0), (carol, "it's Carol", 1)]
    items, totals = await api.settled_inbox(anna_token, lambda items, totals: _summary(items) == expected)
    assert _summary(items) == expected and totals == {"total": 1, "dialogs": 1}
    await api.read(anna_token, carol)
    _, totals = await api.settled_inbox(anna_token, lambda items, totals: totals["total"] == 0)
    assert totals == {"total": 0, "dialogs": 0}


async def test_pages_walk_every_conversation_once(cluster: Cluster) -> None:
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    peers = []
    for index in range(7):
        peer, token = await api.user(f"Peer{index}")
        await api.send(token, anna, f"from {index}")
        peers.append(peer)
    newest_first = list(reversed(peers))
    items, _ = await api.settled_inbox(anna_token, lambda items, totals: len(items) == 7)
    assert [item["user_id"] for item in items] == newest_first
    pages, before = [], None
    while True:
        reply = await api.inbox(anna_token, limit=3, before=before)
        assert reply.status == 200, reply.body
        if not reply.json:
            break
        pages.append([item["user_id"] for item in reply.json])
        before = reply.json[-1]["last_message"]["id"]
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:7]]


async def test_an_inbox_spans_every_shard_and_lives_on_the_users_shard(cluster: Cluster) -> None:
    """Conversations on every shard, one inbox read: the rows sit on the shard that owns the
    user's key, whichever shards hold the dialogs."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    shard_map = await cluster.active_map()
    peers = {}
    for shard_id in shard_map.shard_ids:
        for _ in range(2):
            peer, _ = await api.peer_whose_dialog_goes_to(anna, shard_map, shard_id)
            peers[peer] = shard_id
    for peer in peers:
        await api.send(anna_token, peer, f"to {peer}")
    items, totals = await api.settled_inbox(anna_token, lambda items, totals: len(items) == len(peers))
    assert {item["user_id"] for item in items} == set(peers) and totals == {"total": 0, "dialogs": 0}
    home = shard_map.owner(user_key(uuid.UUID(anna)))
    for shard_id in shard_map.shard_ids:
        rows = await cluster.shard_fetch(shard_id, "SELECT count(*) FROM inbox WHERE owner = $1", uuid.UUID(anna))
        assert rows[0][0] == (len(peers) if shard_id == home else 0), shard_id


async def test_the_badge_survives_many_senders_at_once(cluster: Cluster) -> None:
    """Concurrent sends from many dialogs to one recipient: every one counted once."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    senders = [await api.user(f"S{index}") for index in range(6)]

    async def burst(token: str) -> None:
        for index in range(5):
            assert (await api.send(token, anna, f"m{index}")).status == 200

    await asyncio.gather(*(burst(token) for _, token in senders))
    _, totals = await api.settled_inbox(anna_token, lambda items, totals: totals["total"] == 30)
    assert totals == {"total": 30, "dialogs": 6}


async def test_bad_inbox_requests(cluster: Cluster) -> None:
    api = cluster.api
    _, token = await api.user("Anna")
    for params, words in (
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"before": "abc"}, "before"),
        ({"before": "-1"}, "before"),
    ):
        reply = await api.request("GET", "/dialogs", token=token, params=params)
        assert reply.status == 400 and words in reply.json["message"], (params, reply.body)
    for path in ("/dialogs", "/dialogs/unread"):
        assert (await api.request("GET", path)).status == 401
        assert (await api.request("GET", path, token="not-a-token")).status == 401
    # A user with no conversation: an empty inbox and a zero badge.
    assert (await api.inbox(token)).json == []
    assert (await api.unread(token)).json == {"total": 0, "dialogs": 0}


async def test_verify_finds_what_a_recount_contradicts_and_repair_rewrites_it(cluster: Cluster) -> None:
    """`POST /admin/inbox/verify` (what `dialogs inbox verify` asks): a row lost, a count
    corrupted, a row for a dialog that does not exist and a wrong total are each found;
    `{"repair": true}` rewrites them, after which the API shows the recount."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    carol, carol_token = await api.user("Carol")
    await api.send(boris_token, anna, "one")
    await api.send(boris_token, anna, "two")
    await api.send(carol_token, anna, "three")
    await api.send(anna_token, carol, "four")
    right, totals = await api.settled_inbox(
        anna_token, lambda items, totals: _summary(items) == [(carol, "four", 1), (boris, "two", 2)]
    )
    assert totals == {"total": 3, "dialogs": 2}
    clean = await cluster.admin("POST", "/admin/inbox/verify", {"settle_seconds": 5})
    assert clean.status == 200 and clean.json["differences"] == 0, clean.body
    assert clean.json["dialogs"] == 2 and clean.json["rows"] == 4

    shard_map = await cluster.active_map()
    home = shard_map.owner(user_key(uuid.UUID(anna)))
    carol_home = shard_map.owner(user_key(uuid.UUID(carol)))
    a, b, c = (uuid.UUID(u) for u in (anna, boris, carol))
    await cluster.shard_fetch(home, "UPDATE inbox SET unread = 7 WHERE owner = $1 AND peer = $2", a, b)
    await cluster.shard_fetch(carol_home, "DELETE FROM inbox WHERE owner = $1", c)
    await cluster.shard_fetch(
        home,
        "INSERT INTO inbox SELECT user_key, owner, $2, version, last_id, last_from_owner, last_text, last_at, 1"
        " FROM inbox WHERE owner = $1 AND peer = $3",
        a,
        uuid.uuid4(),
        b,
    )
    await cluster.shard_fetch(home, "UPDATE inbox_totals SET unread = 99 WHERE owner = $1", a)
    found = await cluster.admin("POST", "/admin/inbox/verify", {"settle_seconds": 5})
    assert found.status == 200, found.body
    report = found.json
    kinds = [len(report[kind]) for kind in ("missing", "different", "extra", "totals")]
    assert kinds == [1, 1, 1, 1] and report["differences"] == 4 and report["repaired"] == 0, report
    assert f"{carol} with {anna}" in report["missing"][0]
    assert report["different"][0].endswith("unread 7 (recount: 2)"), report["different"]
    assert report["totals"][0].endswith("stored (unread 99, dialogs 2), recounted (unread 3, dialogs 2)"), report

    repaired = await cluster.admin("POST", "/admin/inbox/verify", {"repair": True, "settle_seconds": 5})
    assert repaired.status == 200 and repaired.json["repaired"] == 3, repaired.body
    again = await cluster.admin("POST", "/admin/inbox/verify", {"settle_seconds": 5})
    assert again.json["differences"] == 0, again.body
    assert await api.whole_inbox(anna_token) == right
    assert (await api.unread(anna_token)).json == totals
    assert [item["user_id"] for item in await api.whole_inbox(carol_token)] == [anna]

    for body, words in (({"repair": "yes"}, "repair"), ({"settle_seconds": -1}, "settle_seconds")):
        refused = await cluster.admin("POST", "/admin/inbox/verify", body)
        assert refused.status == 400 and words in refused.json["message"], refused.body


async def _homed(api: Any, shard_map: Any, shard_id: str) -> tuple[str, str]:
    """A new user whose inbox lives on ``shard_id``, with its token."""
    while True:
        user, token = await api.user("Homed")
        if shard_map.owner(user_key(uuid.UUID(user))) == shard_id:
            return user, token


async def test_a_users_shard_out_of_reach_holds_back_only_its_users_inboxes(bare_cluster: Cluster) -> None:
    """shard-2's database out of the appliers' reach (its registered address made wrong):
    more changes for users homed there than one applier batch wait at the head of shard-1's
    outbox, and a conversation between users homed on shard-1 still shows at once; once
    shard-2 is back, everything arrives and the recount finds no difference."""
    cluster = bare_cluster
    workers = [
        await cluster.start_worker(shard_id, DIALOGS_INBOX_BATCH="4", DIALOGS_POLL_INTERVAL="0.2")
        for shard_id in ("shard-1", "shard-2")
    ]
    await cluster.start_proxy()
    api = cluster.api
    shard_map = await cluster.active_map()
    right_dsn = await cluster.fetch_meta("SELECT dsn FROM shards WHERE shard_id = 'shard-2'")
    away = [await _homed(api, shard_map, "shard-2") for _ in range(3)]
    here, here_token = await _homed(api, shard_map, "shard-1")
    other, other_token = await _homed(api, shard_map, "shard-1")
    await cluster.fetch_meta(
        "UPDATE shards SET dsn = $1 WHERE shard_id = 'shard-2'", f"postgresql://127.0.0.1:{free_port()}/nowhere"
    )
    await asyncio.sleep(0.6)  # the workers' next metadata poll loads it
    try:
        for user, _ in away:  # 3 users x 4 sends = 12 announcements, 3 batches of 4
            for turn in range(4):
                assert (await api.send(here_token, user, f"to away {turn}")).status == 200
        assert (await api.send(other_token, here, "next door")).status == 200
        items, _ = await api.settled_inbox(here_token, lambda items, totals: any(i["user_id"] == other for i in items))
        assert [(i["user_id"], i["unread"]) for i in items if i["user_id"] == other] == [(other, 1)]
        for _, token in away:  # theirs wait
            assert (await api.inbox(token)).json == []

        # Meanwhile the appliers go on applying other changes, a pass every 0.1 s
        # (DIALOGS_INBOX_POLL_INTERVAL), but read the 12 waiting rows again only in a full
        # pass, once shard-2 is to be tried again (a 2 s pause after each failure): not in
        # every pass, which would read them about 30 times in 3 s.
        def read_and_applied() -> tuple[float, float]:
            return (
                sum(metric(worker, "dialogs_worker_inbox_read_total") for worker in workers),
                sum(metric(worker, "dialogs_worker_inbox_applied_total") for worker in workers),
            )

        (read_before, applied_before), loop = read_and_applied(), asyncio.get_running_loop()
        sent, until = 0, loop.time() + 3.0
        while loop.time() < until:
            assert (await api.send(here_token, other, f"meanwhile {sent}")).status == 200
            sent += 1
            await asyncio.sleep(0.05)
        items, _ = await api.settled_inbox(
            other_token, lambda items, totals: [i["last_message"]["text"] for i in items] == [f"meanwhile {sent - 1}"]
        )
        assert [i["last_message"]["text"] for i in items] == [f"meanwhile {sent - 1}"]
        read_after, applied_after = read_and_applied()
        read, applied = read_after - read_before, applied_after - applied_before
        assert applied >= sent, (applied, sent)  # an outbox row per send, each applied
        assert read - applied <= 4 * 12, (read, applied, sent)
    finally:
        await cluster.fetch_meta("UPDATE shards SET dsn = $1 WHERE shard_id = 'shard-2'", right_dsn)

    def arrived(items: list[dict[str, Any]], totals: dict[str, int]) -> bool:
        # Both halves: the items are read before the totals, so an apply landing between
        # the two reads shows in the totals only.
        shown = [(i["user_id"], i["last_message"]["text"]) for i in items]
        return shown == [(here, "to away 3")] and totals == {"total": 4, "dialogs": 1}

    for _, token in away:
        items, totals = await api.settled_inbox(token, arrived)
        assert [(i["user_id"], i["last_message"]["text"]) for i in items] == [(here, "to away 3")]
        assert totals == {"total": 4, "dialogs": 1}
    report = await cluster.admin("POST", "/admin/inbox/verify", {"settle_seconds": 10})
    assert report.json["differences"] == 0 and report.json["pending"] == 0, report.body


async def test_applying_rows_twice_late_or_out_of_order_keeps_the_newest_and_exact_totals(
    databases: dict[str, str],
) -> None:
    """apply_inbox on a shard: a row is kept only if newer; the owner's total moves by the
    changed rows' difference, so repeats, late and reordered deliveries never drift it;
    rows for users the shard does not serve, or serves frozen, are refused."""
    import datetime

    import asyncpg

    from dialogs import inbox, schema
    from dialogs.keys import INT64_MAX, INT64_MIN
    from dialogs.migration_plan import Span
    from proxy.migration import shard_sql

    con = await asyncpg.connect(databases["shard-1"])
    try:
        await schema.upgrade_shard(con)
        await shard_sql.set_state(con, [Span(INT64_MIN, INT64_MAX)], "owned")
        owner = uuid.uuid4()
        key = user_key(owner)
        at = datetime.datetime.now(datetime.UTC)

        def row(peer: uuid.UUID, version: int, unread: int) -> inbox.InboxRow:
            return inbox.InboxRow(key, owner, peer, version, version, False, f"v{version}", at, unread)

        async def state() -> tuple[list[tuple[int, int]], tuple[int, int]]:
            rows = await con.fetch("SELECT version, unread FROM inbox WHERE owner = $1 ORDER BY peer", owner)
            total = await con.fetchrow("SELECT unread, dialogs FROM inbox_totals WHERE owner = $1", owner)
            return [tuple(r) for r in rows], tuple(total)

        a, b = sorted((uuid.uuid4(), uuid.uuid4()))
        assert set((await inbox.apply(con, [row(a, 2, 3), row(b, 1, 1)])).values()) == {"applied"}
        assert await state() == ([(2, 3), (1, 1)], (4, 2))
        await inbox.apply(con, [row(a, 2, 3), row(a, 1, 9)])  # a repeat and an older one: nothing moves
        assert await state() == ([(2, 3), (1, 1)], (4, 2))
        await inbox.apply(con, [row(a, 4, 0), row(a, 3, 5), row(b, 2, 2)])  # the newest of a batch wins
        assert await state() == ([(4, 0), (2, 2)], (2, 1))
        # A frozen range and one not served here: refused, nothing changed.
        await con.execute(
            "SELECT set_range_states($1::bigint[], $2::bigint[], 'frozen', interval '1 minute')",
            [INT64_MIN],
            [INT64_MAX],
        )
        assert set((await inbox.apply(con, [row(a, 5, 7)])).values()) == {"frozen"}
        await shard_sql.set_state(con, [Span(INT64_MIN, INT64_MAX)], "absent")
        assert set((await inbox.apply(con, [row(a, 5, 7)])).values()) == {"not_served"}
        assert await state() == ([(4, 0), (2, 2)], (2, 1))
    finally:
        await con.close()


async def test_appliers_racing_on_one_owners_rows_keep_the_totals_exact(databases: dict[str, str]) -> None:
    """Two connections apply rows of the same owners at once (two shards' appliers, or a
    migration's copy beside an applier), also the same rows with versions crossing: every
    total stays the sum of its owner's rows, and each row the newest version delivered."""
    import datetime
    import random

    import asyncpg

    from dialogs import inbox, schema
    from dialogs.keys import INT64_MAX, INT64_MIN
    from dialogs.migration_plan import Span
    from proxy.migration import shard_sql

    setup = await asyncpg.connect(databases["shard-1"])
    try:
        await schema.upgrade_shard(setup)
        await shard_sql.set_state(setup, [Span(INT64_MIN, INT64_MAX)], "owned")
    finally:
        await setup.close()
    owners = [uuid.uuid4() for _ in range(3)]
    peers = [uuid.uuid4() for _ in range(6)]
    at = datetime.datetime.now(datetime.UTC)
    newest: dict[tuple[uuid.UUID, uuid.UUID], tuple[int, int]] = {}

    def row(owner: uuid.UUID, peer: uuid.UUID, version: int, unread: int) -> inbox.InboxRow:
        best = newest.get((owner, peer))
        if best is None or best[0] < version:
            newest[owner, peer] = (version, unread)
        return inbox.InboxRow(user_key(owner), owner, peer, version, version, False, "t", at, unread)

    async def applier(seed: int) -> None:
        rng = random.Random(seed)
        con = await asyncpg.connect(databases["shard-1"])
        try:
            for version in range(1, 60):
                batch = [
                    row(owner, peer, version * 2 + seed, rng.choice((0, 0, 1, 4)))
                    for owner in owners
                    for peer in rng.sample(peers, 3)
                ]
                assert set((await inbox.apply(con, batch)).values()) == {"applied"}
        finally:
            await con.close()

    await asyncio.gather(applier(0), applier(1))
    con = await asyncpg.connect(databases["shard-1"])
    try:
        for owner in owners:
            stored = {r["peer"]: (r["version"], r["unread"]) for r in await con.fetch(
                "SELECT peer, version, unread FROM inbox WHERE owner = $1", owner)}  # fmt: skip
            assert stored == {peer: kept for (o, peer), kept in newest.items() if o == owner}
            total = await con.fetchrow("SELECT unread, dialogs FROM inbox_totals WHERE owner = $1", owner)
            unread = [u for _, u in stored.values()]
            assert tuple(total) == (sum(unread), sum(1 for u in unread if u > 0))
    finally:
        await con.close()


async def test_an_apply_that_waits_for_a_rows_lock_adds_from_the_row_it_waited_for(databases: dict[str, str]) -> None:
    """One apply holds an owner's row (its transaction open); another, with a newer version
    of that row and a row of its own, waits for it, then counts from the committed row: the
    total is the sum of the rows. A change that moves no count leaves the total as it is, and
    an owner whose first rows have nothing unread still gets its (0, 0) total row (the
    digests that verify a migration compare total rows)."""
    import datetime

    import asyncpg

    from dialogs import inbox, schema
    from dialogs.keys import INT64_MAX, INT64_MIN
    from dialogs.migration_plan import Span
    from proxy.migration import shard_sql

    first = await asyncpg.connect(databases["shard-1"])
    second = await asyncpg.connect(databases["shard-1"])
    try:
        await schema.upgrade_shard(first)
        await shard_sql.set_state(first, [Span(INT64_MIN, INT64_MAX)], "owned")
        owner, quiet = uuid.uuid4(), uuid.uuid4()
        a, b = uuid.uuid4(), uuid.uuid4()
        at = datetime.datetime.now(datetime.UTC)

        def row(who: uuid.UUID, peer: uuid.UUID, version: int, unread: int) -> inbox.InboxRow:
            return inbox.InboxRow(user_key(who), who, peer, version, version, False, "t", at, unread)

        async def total(who: uuid.UUID) -> tuple[int, int] | None:
            found = await first.fetchrow("SELECT unread, dialogs FROM inbox_totals WHERE owner = $1", who)
            return None if found is None else (found["unread"], found["dialogs"])

        await inbox.apply(first, [row(owner, a, 1, 2)])
        holding = first.transaction()
        await holding.start()
        await inbox.apply(first, [row(owner, a, 2, 5)])  # row (owner, a) locked until commit
        waiting = asyncio.ensure_future(inbox.apply(second, [row(owner, a, 3, 1), row(owner, b, 1, 4)]))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it waits for the row's lock
        await holding.commit()
        assert set((await waiting).values()) == {"applied"}
        assert await total(owner) == (1 + 4, 2)
        await inbox.apply(first, [row(owner, b, 2, 4)])  # a new last message, the same count
        assert await total(owner) == (5, 2)
        await inbox.apply(first, [row(quiet, a, 1, 0)])
        assert await total(quiet) == (0, 0)
    finally:
        await first.close()
        await second.close()

"""Sends: idempotent retries, ordering, paging, concurrency."""

from __future__ import annotations

import asyncio

from tests.support import Cluster


async def test_idempotent_retry_stores_one_message(cluster: Cluster) -> None:
    """The same Idempotency-Key sent three times: one row, one id, replays marked as such."""
    api = cluster.api
    anna, token = await api.user("Anna")
    boris = await api.register("Boris")
    first = await api.send(token, boris, "only once", key="retry-1")
    again = await api.send(token, boris, "only once", key="retry-1")
    third = await api.send(token, boris, "only once", key="retry-1")
    assert first.status == again.status == third.status == 200
    assert first.json["id"] == again.json["id"] == third.json["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [m["text"] for m in (await api.list(token, boris)).json] == ["only once"]


async def test_concurrent_retries_store_one_message(cluster: Cluster) -> None:
    """Twenty simultaneous sends with one key (they may share a group commit) store one message."""
    api = cluster.api
    anna, token = await api.user("Anna")
    boris = await api.register("Boris")
    replies = await asyncio.gather(*(api.send(token, boris, "burst", key="same") for _ in range(20)))
    assert {r.status for r in replies} == {200}
    assert len({r.json["id"] for r in replies}) == 1
    assert len((await api.list(token, boris)).json) == 1


async def test_keys_are_per_sender(cluster: Cluster) -> None:
    """Two participants may use the same key in one dialog: they are two messages."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    assert (await api.send(anna_token, boris, "from anna", key="k")).status == 200
    assert (await api.send(boris_token, anna, "from boris", key="k")).status == 200
    assert len((await api.list(anna_token, boris)).json) == 2


async def test_paging_walks_the_whole_dialog_without_gaps_or_repeats(cluster: Cluster) -> None:
    """Pages of 7 with before= the last id cover all 100 messages once, newest first."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    sent = []
    for i in range(100):
        token, to = (anna_token, boris) if i % 3 else (boris_token, anna)
        reply = await api.send(token, to, f"message {i}")
        sent.append(reply.json["id"])
    walked = await api.whole_dialog(anna_token, boris, page=7)
    assert [m["id"] for m in walked] == list(reversed(sent))
    assert [m["text"] for m in walked] == [f"message {i}" for i in reversed(range(100))]
    assert [int(i) for i in sent] == sorted(int(i) for i in sent)
    default_page = await api.list(boris_token, anna)
    assert len(default_page.json) == 100
    assert len((await api.list(boris_token, anna, limit=1000)).json) == 100


async def test_concurrent_sends_are_all_stored_once(cluster: Cluster) -> None:
    """300 concurrent sends over 10 dialogs: each stored once, ids distinct within each dialog."""
    api = cluster.api
    anna, token = await api.user("Anna")
    peers = [await api.register(f"Peer{i}") for i in range(10)]
    texts = {peer: [f"{peer[:8]}-{n}" for n in range(30)] for peer in peers}
    replies = await asyncio.gather(*(api.send(token, peer, text) for peer in peers for text in texts[peer]))
    assert {r.status for r in replies} == {200}
    for index, peer in enumerate(peers):
        ids = {r.json["id"] for r in replies[index * 30 : (index + 1) * 30]}
        assert len(ids) == 30
        listed = (await api.list(token, peer)).json
        assert sorted(m["text"] for m in listed) == sorted(texts[peer])
        assert [int(m["id"]) for m in listed] == sorted((int(m["id"]) for m in listed), reverse=True)


async def test_self_dialog(cluster: Cluster) -> None:
    """A user may write to themselves (saved messages); the dialog lists once per message."""
    api = cluster.api
    anna, token = await api.user("Anna")
    assert (await api.send(token, anna, "note to self")).status == 200
    assert [m["text"] for m in (await api.list(token, anna)).json] == ["note to self"]


async def test_user_profile_and_search(cluster: Cluster) -> None:
    """Profiles read back as registered; search matches name prefixes, LIKE wildcards literally."""
    api = cluster.api
    anna = await api.register("Anna", "Karenina")
    await api.register("Anatoly", "Karpov")
    await api.register("Boris", "Karenin")
    await api.register("An%", "Kar_")
    profile = (await api.request("GET", f"/user/get/{anna}")).json
    assert profile == {
        "id": anna,
        "first_name": "Anna",
        "second_name": "Karenina",
        "birthdate": "1990-05-17",
        "biography": "reads",
        "city": "Moscow",
    }
    found = await api.request("GET", "/user/search", params={"first_name": "An", "last_name": "Kar"})
    assert sorted(u["first_name"] for u in found.json) == ["An%", "Anatoly", "Anna"]
    literal = await api.request("GET", "/user/search", params={"first_name": "An%", "last_name": "Kar_"})
    assert [u["first_name"] for u in literal.json] == ["An%"]
    missing = await api.request("GET", "/user/search", params={"first_name": "An"}, validate=False)
    assert missing.status == 400 and "last_name is required" in missing.json["message"]


async def test_pages_built_by_postgresql_are_the_messages_as_python_writes_them(databases: dict[str, str]) -> None:
    """The worker passes a list's page on as the shard rendered it (LIST_PAGES_QUERY): byte
    for byte what orjson writes for wire.message_json, for texts that need escaping and for
    times with and without a fraction of a second; a batch's queries keep their order,
    limits and cursors, and a range the shard does not serve is that query's error only."""
    import datetime
    import uuid

    import asyncpg
    import orjson

    from dialog_api.app import _PLANS
    from dialog_api.storage import LIST_STATEMENT_QUERIES, ShardStore, ordered
    from dialogs import errors, schema, wire
    from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key
    from dialogs.migration_plan import Span
    from proxy.migration import shard_sql

    texts = [
        'quote " backslash \\ slash / tab \t newline \n return \r',
        "controls \x01\x08\x0c\x1f\x7f and é ü 中文 😀 \u2028\u2029",
        "</script><b>&amp;</b>",
        "x" * 5000,
    ]
    stamps = [
        datetime.datetime(2026, 12, 3, 19, 21, 26, tzinfo=datetime.UTC),  # a whole second: no fraction
        datetime.datetime(2026, 12, 3, 19, 21, 26, 120000, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=datetime.UTC),
        datetime.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC),
    ]
    anna, boris, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    con = await asyncpg.connect(databases["shard-1"])
    # As the worker's pool plans (generic plans), in a session whose time zone is not UTC.
    settings = {**_PLANS, "TimeZone": "Asia/Kolkata"}
    pool = await asyncpg.create_pool(databases["shard-1"], min_size=1, max_size=2, server_settings=settings)
    try:
        await schema.upgrade_shard(con)
        await shard_sql.set_state(con, [Span(INT64_MIN, INT64_MAX)], "owned")
        rows, expected = [], []
        for index, (text, stamp) in enumerate(zip(texts, stamps, strict=True)):
            sender, recipient = (anna, boris) if index % 2 else (boris, anna)
            low, high = ordered(anna, boris)
            rows.append((dialog_key(anna, boris), low, high, 100 + index, sender == low, text, stamp, None))
            expected.append(wire.message_json(100 + index, sender, recipient, text, stamp))
        await con.copy_records_to_table(
            "messages",
            records=rows,
            columns=["dialog_key", "user_lo", "user_hi", "id", "from_lo", "text", "created_at", "idempotency_key"],
        )
        store = ShardStore(pool)

        def query(viewer: uuid.UUID, other: uuid.UUID, before: int = INT64_MAX, limit: int = 100) -> wire.ListQuery:
            return wire.ListQuery(dialog_key(viewer, other), viewer, other, before, limit, 1, "")

        newest_first = expected[::-1]
        pages = await store.list_pages(
            [query(anna, boris), query(boris, anna, before=102, limit=1), query(anna, carol), query(boris, anna)]
        )
        assert pages == [
            wire.Page(orjson.dumps(newest_first), 4),
            wire.Page(orjson.dumps([expected[1]]), 1),
            wire.Page(b"[]", 0),
            wire.Page(orjson.dumps(newest_first), 4),
        ]
        # A batch larger than one statement takes (LIST_STATEMENT_QUERIES): cut into several,
        # each page still in its query's place.
        limits = [1 + index % 4 for index in range(2 * LIST_STATEMENT_QUERIES + 5)]
        pages = await store.list_pages([query(anna, boris, limit=limit) for limit in limits])
        assert pages == [wire.Page(orjson.dumps(newest_first[:limit]), limit) for limit in limits]
        # A range this shard does not serve (a gap around Anna and Carol's dialog): that
        # query's error, the others' pages.
        carol_key = dialog_key(anna, carol)
        assert carol_key != dialog_key(anna, boris)
        await shard_sql.set_state(con, [Span(INT64_MIN, carol_key - 1), Span(carol_key + 1, INT64_MAX)], "owned")
        pages = await store.list_pages([query(anna, carol), query(anna, boris, limit=2)])
        assert isinstance(pages[0], errors.RangeNotServed)
        assert pages[1] == wire.Page(orjson.dumps(newest_first[:2]), 2)
    finally:
        await pool.close()
        await con.close()

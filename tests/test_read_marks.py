"""Read marks and unread counts: `POST /dialog/{user_id}/read`, through the proxy, on real shards."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from dialogs import errors, schema
from dialogs.keys import INT64_MAX, INT64_MIN, dialog_key
from dialogs.migration_plan import Span
from proxy.appkeys import FORWARDER, TOPOLOGY
from proxy.migration import shard_sql
from proxy.retry_policy import Attempt, ErrorAnswer
from tests.support import Cluster, metric


async def test_unread_counts_follow_sends_both_ways_and_read_marks(cluster: Cluster) -> None:
    """Each side's unread count is the other side's messages past its mark; its own never count."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    to_boris = [(await api.send(anna_token, boris, f"a{i}")).json["id"] for i in range(3)]
    to_anna = [(await api.send(boris_token, anna, f"b{i}")).json["id"] for i in range(2)]

    # Boris read up to Anna's second message: one of hers stays unread.
    marked = await api.read(boris_token, anna, to_boris[1])
    assert marked.status == 200, marked.body
    assert marked.json == {"up_to": to_boris[1], "unread": 1}
    # Anna has read nothing: both of Boris's messages are unread; a mark on her own last
    # message (the dialog's newest) reads everything before it.
    assert (await api.read(anna_token, boris, to_boris[0])).json == {"up_to": to_boris[0], "unread": 2}
    assert (await api.read(anna_token, boris)).json == {"up_to": to_anna[-1], "unread": 0}

    # New messages from Anna are unread for Boris until he reads them.
    newer = (await api.send(anna_token, boris, "a3")).json["id"]
    assert (await api.read(boris_token, anna, to_boris[1])).json == {"up_to": to_boris[1], "unread": 2}
    assert (await api.read(boris_token, anna, newer)).json == {"up_to": newer, "unread": 0}


async def test_marks_only_move_forward_and_repeat_harmlessly(cluster: Cluster) -> None:
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    ids = [(await api.send(anna_token, boris, f"m{i}")).json["id"] for i in range(4)]
    assert (await api.read(boris_token, anna, ids[2])).json == {"up_to": ids[2], "unread": 1}
    # An older mark (out of order, as from a slow second device) changes nothing.
    assert (await api.read(boris_token, anna, ids[0])).json == {"up_to": ids[2], "unread": 1}
    # The same mark again, and again at once from several devices: the same answer.
    again = await asyncio.gather(*(api.read(boris_token, anna, ids[2]) for _ in range(5)))
    assert {r.status for r in again} == {200}
    assert all(r.json == {"up_to": ids[2], "unread": 1} for r in again)
    # No body, an empty object and a null mark all mean "up to the newest".
    for body in (None, {}, {"up_to": None}):
        reply = await api.request("POST", f"/dialog/{anna}/read", token=boris_token, body=body)
        assert reply.status == 200, reply.body
        assert reply.json == {"up_to": ids[3], "unread": 0}
    # The state is the same from either end of the dialog: Anna's count is untouched.
    assert (await api.read(anna_token, boris, ids[0])).json == {"up_to": ids[0], "unread": 0}


async def test_an_empty_dialog_and_bad_marks(cluster: Cluster) -> None:
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    carol, carol_token = await api.user("Carol")
    # Nothing to read yet: no mark, nothing unread.
    assert (await api.read(anna_token, boris)).json == {"up_to": None, "unread": 0}
    sent = (await api.send(anna_token, boris, "hello")).json["id"]
    other_dialog = (await api.send(carol_token, boris, "hi")).json["id"]

    # A message of another dialog, or no message at all, is no mark of this one.
    for up_to in (other_dialog, "1", str(int(sent) + 1)):
        reply = await api.read(boris_token, anna, up_to)
        assert reply.status == 404, reply.body
        assert reply.json["message"] == f"message {up_to} is not in this dialog"
    for body, words in (
        ({"up_to": "abc"}, "up_to must be a message id"),
        ({"up_to": "-5"}, "up_to must be a message id"),
        ({"up_to": True}, "up_to must be a message id"),
        ({"up_to": int(sent)}, "up_to must be a message id"),
        ({"up_to": "99999999999999999999"}, "up_to must be a message id"),
        (["up_to"], "request body must be a JSON object"),
        ({"upto": sent}, "unknown field(s) upto: a read mark takes only up_to"),
    ):
        reply = await api.request("POST", f"/dialog/{anna}/read", token=boris_token, body=body)
        assert reply.status == 400, (body, reply.body)
        assert words in reply.json["message"]
    reply = await api.request("POST", f"/dialog/{anna}/read", token=boris_token, raw=b"{not json")
    assert reply.status == 400
    unknown = "00000000-0000-4000-8000-000000000000"
    assert (await api.read(boris_token, unknown)).status == 404
    assert (await api.request("POST", f"/dialog/{anna}/read", body={})).status == 401
    # None of it moved Boris's mark: Anna's message is still unread.
    assert (await api.read(boris_token, anna, sent)).json == {"up_to": sent, "unread": 0}
    # The worker's 404s were answers to the client's mistakes, not failures of the hop.
    proxy = cluster.proxies[0]
    shards = [*cluster.shard_dsns]
    assert [metric(proxy, "dialogs_proxy_forward_errors_total", shard_id=s, reason="404") for s in shards] == [0, 0]


async def test_unread_counts_hold_under_concurrent_sends_and_marks(cluster: Cluster) -> None:
    """Sends and marks racing on one dialog from two proxies' worth of clients: at the end,
    each side's count is exactly the other side's messages past its mark."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")
    sent: list[str] = []

    async def sender(n: int) -> None:
        for i in range(15):
            reply = await api.send(anna_token, boris, f"{n}-{i}")
            assert reply.status == 200
            sent.append(reply.json["id"])

    async def reader() -> None:
        for _ in range(15):
            reply = await api.read(boris_token, anna)
            assert reply.status == 200, reply.body
            await asyncio.sleep(0.005)

    await asyncio.gather(*(sender(n) for n in range(4)), reader())
    listed = await api.whole_dialog(boris_token, anna)
    assert len(listed) == 60
    # The oldest message as the mark: older than the stored one, so it answers with that.
    mark = (await api.read(boris_token, anna, listed[-1]["id"])).json
    assert mark["up_to"] in {m["id"] for m in listed}
    assert mark["unread"] == sum(int(m["id"]) > int(mark["up_to"]) for m in listed)
    assert (await api.read(boris_token, anna)).json == {"up_to": listed[0]["id"], "unread": 0}


async def test_upgrading_a_shard_fills_each_dialogs_state_from_its_messages(databases: dict[str, str]) -> None:
    """A shard of the previous schema (messages, no dialog state) upgraded in place: every
    dialog's sent counts are its messages', nothing read yet, and sends go on counting."""
    con = await asyncpg.connect(databases["shard-1"])
    try:
        await schema.upgrade_shard(con, until=5)
        await shard_sql.set_state(con, [Span(INT64_MIN, INT64_MAX)], "owned")
        a, b = sorted((uuid.uuid4(), uuid.uuid4()))
        key = dialog_key(a, b)

        async def store(from_lo: list[bool]) -> None:
            n = len(from_lo)
            await con.fetch(
                "SELECT * FROM store_messages($1, $2, $3, $4, $5, $6)",
                [key] * n, [a] * n, [b] * n, from_lo, ["x"] * n, [None] * n,
            )  # fmt: skip

        await store([True, True, False])
        assert await schema.upgrade_shard(con, until=6) == ["0006_dialog_state.sql"]
        state = await con.fetchrow("SELECT version, sent_lo, sent_hi, read_lo, read_hi FROM dialog_state")
        assert dict(state) == {"version": 1, "sent_lo": 2, "sent_hi": 1, "read_lo": 0, "read_hi": 0}
        await store([False, True])
        state = await con.fetchrow("SELECT version, sent_lo, sent_hi FROM dialog_state")
        assert dict(state) == {"version": 2, "sent_lo": 3, "sent_hi": 2}
        # A send another worker stored with the previous function during the upgrade is not
        # counted; the recount the upgrade runs after its commit finds it.
        await con.execute("UPDATE dialog_state SET sent_hi = sent_hi - 1")
        await con.execute("SELECT recount_dialog_states()")
        state = await con.fetchrow("SELECT version, sent_lo, sent_hi FROM dialog_state")
        assert dict(state) == {"version": 3, "sent_lo": 3, "sent_hi": 2}
        # The inbox's upgrade announces every dialog, so the appliers build the inboxes.
        assert await schema.upgrade_shard(con, until=7) == ["0007_inbox.sql"]
        announced = await con.fetch("SELECT DISTINCT dialog_key, user_lo, user_hi FROM inbox_outbox")
        assert [tuple(row) for row in announced] == [(key, a, b)]
    finally:
        await con.close()


async def test_a_worker_refusing_the_hop_counts_as_a_forward_error_and_a_clients_mistake_does_not(
    cluster: Cluster,
) -> None:
    """What the per-shard error panel counts (``dialogs_proxy_forward_errors_total``): a
    worker's 401 or 413 (a wrong secret, a batch too large: the hop is broken) is counted
    under its status; its 404 or 422 (the client's own mistake) is only the client's answer."""
    forwarder = cluster.proxies[0].app[FORWARDER]
    topology = cluster.proxies[0].app[TOPOLOGY]
    assert topology.map is not None
    proxy = cluster.proxies[0]
    shard_id = topology.map.owner(1)  # any key: the shard that owns it is tried
    cases = [
        (errors.Unauthorized("wrong internal secret"), 1),
        (errors.BodyTooLarge(), 1),
        (errors.MessageNotFound("no such message"), 0),
        (errors.IdempotencyKeyReused(), 0),
    ]
    for error, counted in cases:

        async def attempt(url: str, map_version: int, error: errors.DialogsError = error) -> Attempt:
            return ErrorAnswer(error)

        before = metric(proxy, "dialogs_proxy_forward_errors_total", shard_id=shard_id, reason=str(error.status))
        with pytest.raises(type(error)):
            await forwarder._route(1, "read", attempt, True)
        after = metric(proxy, "dialogs_proxy_forward_errors_total", shard_id=shard_id, reason=str(error.status))
        assert after - before == counted, (error, after - before)

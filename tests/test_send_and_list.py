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

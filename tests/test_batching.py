"""Sends and lists travel from proxy to worker in batches: fewer hops, the same answers per request."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace

import orjson
import pytest
from aiohttp import web

from dialog_api import handlers
from dialog_api.app import inbox_reads_at_once
from dialog_api.appkeys import MAP_VIEW, SETTINGS, STORE
from dialogs import wire
from dialogs.keys import INT64_MAX, dialog_key, user_key
from proxy.appkeys import FORWARDER, TOPOLOGY
from proxy.retry_policy import Answered
from tests.support import Cluster, metric


async def _peers_on_one_shard(cluster: Cluster, hub: str, count: int) -> list[str]:
    peers: dict[str, list[str]] = {}
    for i in range(200):
        peer = await cluster.api.register(f"Peer{i}")
        shard_peers = peers.setdefault(await cluster.shard_of(hub, peer), [])
        shard_peers.append(peer)
        if len(shard_peers) == count:
            return shard_peers
    raise AssertionError("not enough peers on one shard")


async def test_concurrent_sends_share_batches_and_each_gets_its_own_answer(cluster: Cluster) -> None:
    """Forty sends at once to one shard: fewer batches than sends, every send stored once,
    and a reused Idempotency-Key in the same burst is refused for that send alone."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_on_one_shard(cluster, hub, 4)
    first = await api.send(token, peers[0], "original", key="reused-key")
    assert first.status == 200
    batches_before = metric(cluster.proxies[0], "dialogs_proxy_send_batch_size_count")
    replies = await asyncio.gather(
        *(api.send(token, peers[i % 4], f"m{i}", key=f"k{i}") for i in range(40)),
        api.send(token, peers[0], "not the original", key="reused-key"),
    )
    assert [reply.status for reply in replies[:40]] == [200] * 40
    assert replies[40].status == 422 and replies[40].json["code"] == 42201
    batches = metric(cluster.proxies[0], "dialogs_proxy_send_batch_size_count") - batches_before
    assert 1 <= batches < 41, batches
    for i, peer in enumerate(peers):
        texts = sorted(m["text"] for m in (await api.list(token, peer)).json)
        assert texts == sorted([f"m{j}" for j in range(40) if j % 4 == i] + (["original"] if i == 0 else []))


async def test_concurrent_lists_share_batches_and_each_gets_its_own_page(cluster: Cluster) -> None:
    """Forty lists at once to one shard: fewer batches than lists, and each list its own
    dialog's page, with its own limit and cursor; a list of an unknown user in the same
    burst is that list's 404 alone."""
    api = cluster.api
    hub, token = await api.user("Hub")
    peers = await _peers_on_one_shard(cluster, hub, 4)
    for i, peer in enumerate(peers):
        for j in range(3):
            assert (await api.send(token, peer, f"p{i}m{j}")).status == 200
    batches_before = metric(cluster.proxies[0], "dialogs_proxy_list_batch_size_count")
    replies = await asyncio.gather(
        *(api.list(token, peers[i % 4], limit=1 + i % 3) for i in range(40)),
        api.list(token, str(uuid.uuid4())),
    )
    for i, reply in enumerate(replies[:40]):
        assert reply.status == 200
        assert [m["text"] for m in reply.json] == [f"p{i % 4}m{j}" for j in (2, 1, 0)][: 1 + i % 3]
    assert replies[40].status == 404
    batches = metric(cluster.proxies[0], "dialogs_proxy_list_batch_size_count") - batches_before
    assert 1 <= batches < 41, batches
    newest = (await api.list(token, peers[0], limit=1)).json[0]
    older = await api.list(token, peers[0], before=newest["id"])
    assert [m["text"] for m in older.json] == ["p0m1", "p0m0"]


async def test_concurrent_inbox_pages_and_badges_share_batches_and_each_gets_its_own(cluster: Cluster) -> None:
    """Ten users' inboxes and badges read at once: fewer batches than reads on the inbox
    paths, and each user's own page and totals (user i has i + 1 unread from one sender)."""
    api = cluster.api
    sender, sender_token = await api.user("Sender")
    readers = [await api.user(f"Reader{i}") for i in range(10)]
    for i, (reader, _) in enumerate(readers):
        for j in range(i + 1):
            assert (await api.send(sender_token, reader, f"r{i}m{j}")).status == 200
    for i, (_, token) in enumerate(readers):
        await api.settled_inbox(token, lambda items, totals, i=i: totals == {"total": i + 1, "dialogs": 1})

    def batches() -> float:
        return sum(
            metric(worker, "dialogs_worker_requests_total", route=path, method="WS", status="200")
            for worker in cluster.workers.values()
            for path in (wire.INTERNAL_INBOX_PAGES_PATH, wire.INTERNAL_UNREAD_BATCH_PATH)
        )

    before = batches()
    pages = await asyncio.gather(*(api.inbox(token) for _, token in readers))
    badges = await asyncio.gather(*(api.unread(token) for _, token in readers))
    for i, (page, badge) in enumerate(zip(pages, badges, strict=True)):
        assert page.status == 200 and badge.status == 200
        ((conversation,),) = [page.json]
        assert conversation["user_id"] == sender and conversation["unread"] == i + 1
        assert conversation["last_message"]["text"] == f"r{i}m{i}"
        assert badge.json == {"total": i + 1, "dialogs": 1}
    # Each kind's queue per worker sends its first read alone, then the rest together as
    # they queue (how many batches that makes depends on the machine's pace): fewer
    # batches than the 20 reads.
    assert 2 <= batches() - before < 20


async def _owners_of_one_worker(cluster: Cluster, count: int) -> tuple[web.AppRunner, list[uuid.UUID]]:
    """A worker and ``count`` registered users whose inbox it serves (by the active map)."""
    topology = cluster.proxies[0].app[TOPOLOGY]
    assert topology.map is not None
    by_shard: dict[str, list[uuid.UUID]] = {}
    while max((len(users) for users in by_shard.values()), default=0) < count:
        user = uuid.UUID(await cluster.api.register("Reader"))
        by_shard.setdefault(topology.map.owner(user_key(user)), []).append(user)
    shard_id, owners = max(by_shard.items(), key=lambda item: len(item[1]))
    (runner,) = [runner for name, runner in cluster.workers.items() if name.startswith(shard_id + "@")]
    return runner, owners


def _unread_batch(owners: list[uuid.UUID], map_version: int, prefix: str) -> bytes:
    """A proxy's batch of unread-total queries, as it travels to a worker."""
    return orjson.dumps(
        [
            wire.InboxQuery(user_key(owner), owner, INT64_MAX, 1, map_version, f"{prefix}-{i}").to_json()
            for i, owner in enumerate(owners)
        ]
    )


async def test_an_inbox_read_that_fails_unexpectedly_fails_alone(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one query's read is that query's 500 under its own request id, logged under
    it, never its batch's: the other queries of the same batch get their answers."""
    runner, owners = await _owners_of_one_worker(cluster, 3)
    app = runner.app
    store = app[STORE]
    read = store.unread_totals

    async def unread_totals(query: wire.InboxQuery) -> wire.UnreadTotals:
        if query.owner == owners[1]:
            raise RuntimeError("a bug in one query's read")
        return await read(query)

    store.unread_totals = unread_totals  # type: ignore[method-assign]
    body = _unread_batch(owners, app[MAP_VIEW].map_version, "isolated")
    with caplog.at_level(logging.ERROR):
        answers = orjson.loads(await handlers.read_unread_totals(app, body, "the-batch"))
    assert answers[0] == answers[2] == {"status": 200, "total": 0, "dialogs": 0}
    assert answers[1]["status"] == 500 and answers[1]["request_id"] == "isolated-1", answers[1]
    assert "a bug" not in answers[1]["message"]  # nothing of the bug reaches the client
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.request_id == "isolated-1" and record.exc_info is not None  # type: ignore[attr-defined]


async def test_inbox_reads_of_many_batches_hold_at_most_half_the_pool(cluster: Cluster) -> None:
    """Two batches of eight unread totals at once (as two proxies send them): at most half
    the worker's pool reads at a time, whatever the batches, and every query is answered."""
    runner, owners = await _owners_of_one_worker(cluster, 8)
    app = runner.app
    store = app[STORE]
    read = store.unread_totals
    running = peak = 0

    async def unread_totals(query: wire.InboxQuery) -> wire.UnreadTotals:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.05)  # long enough for every read that may start to start
            return await read(query)
        finally:
            running -= 1

    store.unread_totals = unread_totals  # type: ignore[method-assign]
    version = app[MAP_VIEW].map_version
    answers = await asyncio.gather(
        *(handlers.read_unread_totals(app, _unread_batch(owners, version, name), name) for name in ("a", "b"))
    )
    assert [answer["status"] for body in answers for answer in orjson.loads(body)] == [200] * 16
    assert peak == inbox_reads_at_once(app[SETTINGS].pool_max) == 4


async def test_a_lone_send_is_not_held_back(cluster: Cluster) -> None:
    """No timer: an idle proxy sends a single message as a batch of one within the event loop
    turns that follow the send (a flush timer, however short, would need its delay to pass)."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    proxy = cluster.proxies[0].app
    batcher = proxy[FORWARDER].batcher
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    topology = proxy[TOPOLOGY]
    assert topology.map is not None
    url = topology.candidates(topology.map.owner(key))[0]
    posted: list[int] = []
    original = batcher._deliver

    async def observed(channel, target, queue, items):  # type: ignore[no-untyped-def]
        posted.append(len(items))
        return await original(channel, target, queue, items)

    batcher._deliver = observed  # type: ignore[method-assign]
    item = wire.SendItem(key, uuid.UUID(anna), uuid.UUID(boris), "alone", None, topology.map_version, "lone")
    sending = asyncio.ensure_future(batcher.submit(proxy[FORWARDER]._sends, url, item))
    for _ in range(5):  # zero-delay yields: no timer can be due in between unless the loop stalls
        if posted:
            break
        await asyncio.sleep(0)
    assert posted == [1]
    outcome = await sending
    assert isinstance(outcome, Answered), outcome
    assert [m["text"] for m in (await cluster.api.list(token, boris)).json] == ["alone"]


async def test_a_send_right_after_a_batch_finished_is_not_stranded(cluster: Cluster) -> None:
    """Sends one after the other from one task: each starts or finds a live flusher (a
    flusher that has just finished must not count as running)."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    proxy = cluster.proxies[0].app
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    topology = proxy[TOPOLOGY]
    assert topology.map is not None
    url = topology.candidates(topology.map.owner(key))[0]
    item = wire.SendItem(key, uuid.UUID(anna), uuid.UUID(boris), "", None, topology.map_version, "direct")
    for i in range(5):
        async with asyncio.timeout(5):  # awaited directly: no extra task between two sends
            outcome = await proxy[FORWARDER].batcher.submit(proxy[FORWARDER]._sends, url, replace(item, text=f"m{i}"))
        assert isinstance(outcome, Answered), outcome
    assert len((await cluster.api.list(token, boris)).json) == 5

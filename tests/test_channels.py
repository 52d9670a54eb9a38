"""Batches travel from proxy to worker on persistent channels (WebSockets), on real workers.

A channel carries many batches, each answered as its POST would be. A worker closes a
channel only when it has answered every batch the channel took: when it is idle past the
worker's idle timeout, and when the worker shuts down (a busy channel answers its batch
first). The proxy sends a batch that met such a close again on a new channel, so clients
never see it. A worker that refuses the upgrade gets the batch as a POST.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from dialog_api.channels import CLOSE_TIMEOUT
from dialogs import errors, wire
from dialogs.keys import dialog_key
from proxy.appkeys import FORWARDER, TOPOLOGY
from proxy.batcher import POST_ONLY_SECONDS, _Link
from proxy.retry_policy import Answered, ErrorAnswer
from tests.support import Cluster, commits_blocked, metric, until, worker_url

pytestmark = pytest.mark.timeout(60)


async def test_one_channel_carries_many_batches(cluster: Cluster) -> None:
    """Sends and lists one after another: one channel for each kind per worker, however many
    batches, and the worker counts each batch as a request of its route."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    for i in range(20):
        assert (await cluster.api.send(token, boris, f"m{i}")).status == 200
        assert len((await cluster.api.list(token, boris)).json) == i + 1
    worker = next(
        runner
        for runner in cluster.workers.values()
        if metric(runner, "dialogs_worker_requests_total", route=wire.INTERNAL_BATCH_PATH, method="WS", status="200")
    )
    assert (
        metric(worker, "dialogs_worker_requests_total", route=wire.INTERNAL_BATCH_PATH, method="WS", status="200") == 20
    )
    assert (
        metric(worker, "dialogs_worker_requests_total", route=wire.INTERNAL_PAGES_PATH, method="WS", status="200") == 20
    )
    assert (
        metric(worker, "dialogs_worker_requests_total", route=wire.INTERNAL_BATCH_PATH, method="POST", status="200")
        == 0
    )
    assert metric(worker, "dialogs_worker_channels_opened_total") == 2
    assert metric(worker, "dialogs_worker_channels_open") == 2
    assert cluster.proxies[0].app[FORWARDER].batcher.open_channels == 2


async def test_a_channel_closed_as_idle_is_replaced_unseen(bare_cluster: Cluster) -> None:
    """A worker closes a channel idle past its idle timeout; sends paced around it find their
    channel closed and go on new ones. Every send is answered and stored once."""
    cluster = bare_cluster
    for shard_id in cluster.shard_dsns:
        await cluster.start_worker(shard_id, DIALOGS_IDLE_TIMEOUT="0.05")
    await cluster.start_proxy()
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    for i in range(60):
        reply = await cluster.api.send(token, boris, f"paced {i}")
        assert reply.status == 200, reply.body
        await asyncio.sleep(0.03 + (i % 5) * 0.01)  # around the idle timeout, on both sides of it
    texts = [m["text"] for m in await cluster.api.whole_dialog(token, boris)]
    assert texts == [f"paced {i}" for i in reversed(range(60))]
    opened = sum(metric(runner, "dialogs_worker_channels_opened_total") for runner in cluster.workers.values())
    assert opened > 10, "the channels were not closed as idle: the test shows nothing"


async def test_a_batch_that_meets_an_idle_close_goes_again_on_a_new_channel(bare_cluster: Cluster) -> None:
    """The race a worker's idle close leaves: the proxy sends a batch before it has read the
    close. The worker drops the batch unread, and the proxy, seeing GOING_AWAY, sends it
    again on a new channel: an unkeyed send is a 200 and stored once."""
    cluster = bare_cluster
    for shard_id in cluster.shard_dsns:
        await cluster.start_worker(shard_id, DIALOGS_IDLE_TIMEOUT="0.3")
    await cluster.start_proxy()
    anna = await cluster.api.register("Anna")
    boris = await cluster.api.register("Boris")
    proxy = cluster.proxies[0].app
    forwarder, topology = proxy[FORWARDER], proxy[TOPOLOGY]
    batcher = forwarder.batcher
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    assert topology.map is not None
    url = topology.candidates(topology.map.owner(key))[0]

    def item(text: str) -> wire.SendItem:
        return wire.SendItem(key, uuid.UUID(anna), uuid.UUID(boris), text, None, topology.map_version, text)

    assert isinstance(await batcher.submit(forwarder._sends, url, item("opens")), Answered)
    (link,) = batcher._queues[(url, wire.INTERNAL_BATCH_PATH)].idle
    # The proxy's reader of this channel falls behind: it reads again only once the next
    # batch is written, so the worker's close is still unread when that batch goes out.
    link._reader.cancel()
    await asyncio.gather(link._reader, return_exceptions=True)
    written = asyncio.Event()
    send_bytes = link.ws.send_bytes

    async def send_then_read(data: bytes) -> None:
        await send_bytes(data)
        written.set()

    async def late_reader() -> None:
        await written.wait()
        await _Link._read(link)

    link.ws.send_bytes = send_then_read  # type: ignore[method-assign]
    link._reader = asyncio.ensure_future(late_reader())
    await asyncio.sleep(0.8)  # the worker closed the idle channel (and waits for our close)
    outcome = await batcher.submit(forwarder._sends, url, item("after the close"))
    assert isinstance(outcome, Answered), outcome
    assert written.is_set()
    assert await cluster.stored("after the close") == 1


async def test_a_worker_shutting_down_answers_the_batch_on_its_channel(bare_cluster: Cluster) -> None:
    """A worker told to stop while a batch is being stored answers that batch before it closes
    the channel: the unkeyed send (which a proxy may not send twice) is a 200, stored once."""
    cluster = bare_cluster
    shard_1 = await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-2")
    await cluster.start_proxy()
    anna, token = await cluster.api.user("Anna")
    peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, await cluster.active_map(), "shard-1")
    assert (await cluster.api.send(token, peer, "opens the channel")).status == 200
    async with commits_blocked(cluster.dsn("shard-1")) as blocker:
        sending = asyncio.ensure_future(cluster.api.send(token, peer, "in flight at shutdown"))

        async def waiting() -> bool:
            return bool(await blocker.fetchval("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted)"))

        await until(waiting)
        name = next(name for name, runner in cluster.workers.items() if runner is shard_1)
        stopping = asyncio.ensure_future(cluster.workers.pop(name).cleanup())
        await asyncio.sleep(0.5)  # the shutdown has begun; the channel's batch still waits
        assert not sending.done()
    reply = await asyncio.wait_for(sending, 10)
    assert reply.status == 200, reply.body
    await asyncio.wait_for(stopping, 15)
    assert await cluster.stored("in flight at shutdown") == 1


async def test_an_idle_channel_closes_when_its_worker_stops(bare_cluster: Cluster) -> None:
    """A worker's shutdown closes its idle channels without waiting on them (the proxy answers
    each close at once), and the proxy's next batches go to the shard's other worker
    without an error."""
    cluster = bare_cluster
    first = await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-2")
    await cluster.start_proxy()
    anna, token = await cluster.api.user("Anna")
    peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, await cluster.active_map(), "shard-1")
    for i in range(6):  # the proxy spreads a shard's batches over its workers
        assert (await cluster.api.send(token, peer, f"before {i}")).status == 200
    assert metric(first, "dialogs_worker_channels_open") >= 1
    name = next(name for name, runner in cluster.workers.items() if runner is first)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cluster.workers.pop(name).cleanup()
    # A close the proxy did not answer would hold the worker's shutdown for CLOSE_TIMEOUT.
    assert loop.time() - started < CLOSE_TIMEOUT, "the worker's shutdown waited on its idle channels"
    for i in range(6):
        reply = await cluster.api.send(token, peer, f"after {i}")
        assert reply.status == 200, reply.body
    texts = [m["text"] for m in await cluster.api.whole_dialog(token, peer)]
    assert texts == [f"after {i}" for i in reversed(range(6))] + [f"before {i}" for i in reversed(range(6))]


async def test_a_refused_upgrade_sends_the_batch_as_a_post(cluster: Cluster) -> None:
    """A worker that answers the upgrade with an HTTP error (here: a wrong secret) gets the
    batch as a POST, whose answer is the worker's own error, and POSTs for a while."""
    anna = await cluster.api.register("Anna")
    boris = await cluster.api.register("Boris")
    proxy = cluster.proxies[0].app
    forwarder = proxy[FORWARDER]
    batcher = forwarder.batcher
    batcher._channel_headers = {"Authorization": "Bearer wrong-secret-" + "z" * 32}
    batcher._headers = {**batcher._channel_headers, "Content-Type": "application/json"}
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    topology = proxy[TOPOLOGY]
    assert topology.map is not None
    url = topology.candidates(topology.map.owner(key))[0]
    item = wire.SendItem(key, uuid.UUID(anna), uuid.UUID(boris), "refused", None, topology.map_version, "refused")
    worker = next(runner for runner in cluster.workers.values() if worker_url(runner) == url)
    posts = metric(worker, "dialogs_worker_requests_total", route=wire.INTERNAL_BATCH_PATH, method="POST", status="401")
    outcome = await batcher.submit(forwarder._sends, url, item)
    assert isinstance(outcome, ErrorAnswer), outcome
    assert (
        metric(worker, "dialogs_worker_requests_total", route=wire.INTERNAL_BATCH_PATH, method="POST", status="401")
        == posts + 1
    )
    assert isinstance(outcome.error, errors.Unauthorized) and outcome.error.message == "wrong internal secret"
    queue = batcher._queues[(url, wire.INTERNAL_BATCH_PATH)]
    assert queue.post_until > asyncio.get_running_loop().time() + POST_ONLY_SECONDS / 2
    assert await cluster.stored("refused") == 0


async def test_without_channels_batches_are_posts(bare_cluster: Cluster) -> None:
    """DIALOGS_WORKER_CHANNELS=false: the same answers, one POST per batch."""
    cluster = bare_cluster
    for shard_id in cluster.shard_dsns:
        await cluster.start_worker(shard_id)
    await cluster.start_proxy(DIALOGS_WORKER_CHANNELS="false")
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    replies = await asyncio.gather(*(cluster.api.send(token, boris, f"m{i}") for i in range(10)))
    assert [reply.status for reply in replies] == [200] * 10
    pages = await asyncio.gather(*(cluster.api.list(token, boris, limit=i + 1) for i in range(10)))
    assert [len(page.json) for page in pages] == [i + 1 for i in range(10)]
    assert sum(metric(runner, "dialogs_worker_channels_opened_total") for runner in cluster.workers.values()) == 0
    posts = sum(
        metric(runner, "dialogs_worker_requests_total", route=path, method="POST", status="200")
        for runner in cluster.workers.values()
        for path in (wire.INTERNAL_BATCH_PATH, wire.INTERNAL_PAGES_PATH)
    )
    assert 2 <= posts <= 20


async def test_an_answer_that_comes_too_late_is_nobody_elses(bare_cluster: Cluster) -> None:
    """A batch whose answer does not come within the forward timeout is a 503 (it may be
    stored: unkeyed, it is not sent again), and its channel is closed: the late answer is
    never read as the next batch's. The next send gets its own id."""
    cluster = bare_cluster
    for shard_id in cluster.shard_dsns:
        await cluster.start_worker(shard_id)
    await cluster.start_proxy(DIALOGS_FORWARD_TIMEOUT="1")
    anna, token = await cluster.api.user("Anna")
    peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, await cluster.active_map(), "shard-1")
    assert (await cluster.api.send(token, peer, "opens the channel")).status == 200
    async with commits_blocked(cluster.dsn("shard-1")):
        late = await cluster.api.send(token, peer, "answered too late")
        assert late.status == 503, late.body
    await until(lambda: _stored_once(cluster, "answered too late"))
    after = await cluster.api.send(token, peer, "after the late one")
    assert after.status == 200, after.body
    newest = (await cluster.api.list(token, peer, limit=1)).json[0]
    assert (newest["text"], newest["id"]) == ("after the late one", after.json["id"])
    assert [await cluster.stored(text) for text in ("answered too late", "after the late one")] == [1, 1]


async def _stored_once(cluster: Cluster, text: str) -> bool:
    return await cluster.stored(text) == 1

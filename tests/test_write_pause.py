"""A switchover's write pause, on real workers and shards (no replication needed to show it).

While a shard's workers have their writes paused, sends to it are held at the proxy (as
during a failover) and stored once each when the pause ends; nothing reaches the database
meanwhile. A pause waits for the commits in flight. It is a lease held by one switchover:
a caller that never resumes leaves it for at most the lease, and two switchovers do not
end each other's. The worker's pause route takes only the proxies' secret and sane bounds.
A switchover that Patroni refuses leaves no worker paused.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dialog_api.appkeys import GROUP_COMMIT
from dialogs import errors, wire
from dialogsctl.net import free_port
from proxy import switchover as switchover_module
from proxy.switchover import PAUSE_LEASE_SECONDS, Paused, switchover, writes_paused
from tests.support import INTERNAL_SECRET, Cluster, commits_blocked, metric, start_site, until, worker_url

HEADERS = {"Authorization": f"Bearer {INTERNAL_SECRET}"}


async def _post(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=HEADERS) as response:
        return response.status, await response.json()


async def _waiting_for_the_fence(dsn: str) -> bool:
    con = await asyncpg.connect(dsn)
    try:
        return bool(
            await con.fetchval("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)")
        )
    finally:
        await con.close()


async def _paused(worker: web.AppRunner) -> bool:
    return metric(worker, "dialogs_worker_writes_paused") == 1


pytestmark = pytest.mark.timeout(60)


async def test_sends_wait_out_a_write_pause_and_are_stored_once(bare_cluster: Cluster) -> None:
    """Unkeyed sends to a paused shard are held by the proxy, not failed, and land once
    the pause ends; sends to the other shard go on meanwhile."""
    cluster = bare_cluster
    shard_1 = await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-2")
    await cluster.start_proxy(DIALOGS_FAILOVER_WAIT="30")
    anna, anna_token = await cluster.api.user("Anna")
    shard_map = await cluster.active_map()
    paused_peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, shard_map, "shard-1")
    free_peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, shard_map, "shard-2")

    async with writes_paused(cluster.session, [worker_url(shard_1)], INTERNAL_SECRET) as paused:
        assert (paused.workers, paused.paused) == (1, 1)
        assert metric(shard_1, "dialogs_worker_writes_paused") == 1
        held = [asyncio.ensure_future(cluster.api.send(anna_token, paused_peer, f"held {i}")) for i in range(3)]
        other = await cluster.api.send(anna_token, free_peer, "not held")
        assert other.status == 200, other.body  # another shard's sends do not wait
        await asyncio.sleep(PAUSE_LEASE_SECONDS + 1)  # longer than one lease: the pause is renewed
        assert not any(task.done() for task in held), "a send went through a paused shard"
        assert [await cluster.stored(f"held {i}") for i in range(3)] == [0, 0, 0]
    replies = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert [reply.status for reply in replies] == [200, 200, 200], [reply.body for reply in replies]
    assert metric(shard_1, "dialogs_worker_writes_paused") == 0
    for i in range(3):
        assert await cluster.stored(f"held {i}") == 1
    listed = await cluster.api.whole_dialog(anna_token, paused_peer)
    assert sorted(m["text"] for m in listed) == ["held 0", "held 1", "held 2"]  # sent at once: any order


async def test_a_pause_nobody_ends_runs_out_by_itself(bare_cluster: Cluster) -> None:
    """A switchover whose caller died: the worker commits again when the lease is over, and
    a proxy that does not hold requests answers 503 with the reason meanwhile."""
    cluster = bare_cluster
    shard_1 = await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-2")
    await cluster.start_proxy()  # DIALOGS_FAILOVER_WAIT 0: no holding, the 503 at once
    anna, anna_token = await cluster.api.user("Anna")
    peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, await cluster.active_map(), "shard-1")
    pause = {"holder": "gone", "seconds": 5}
    paused_at = asyncio.get_running_loop().time()
    answer = await _post(cluster.session, worker_url(shard_1) + wire.INTERNAL_PAUSE_PATH, pause)
    assert answer == (200, {"drained": True})
    refused = await cluster.api.send(anna_token, peer, "during the pause")
    assert refused.status == 503 and "paused for a switchover" in refused.json["message"], refused.body
    assert refused.json["code"] == 50302
    await asyncio.sleep(paused_at + 5.2 - asyncio.get_running_loop().time())
    accepted = await cluster.api.send(anna_token, peer, "after the lease")
    assert accepted.status == 200, accepted.body
    assert await cluster.stored("during the pause") == 0 and await cluster.stored("after the lease") == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"holder": "h", "seconds": 0}, "seconds must be a number above 0"),
        ({"holder": "h", "seconds": -1}, "seconds must be a number above 0"),
        ({"holder": "h", "seconds": wire.MAX_WRITE_PAUSE_SECONDS + 1}, "at most 10"),
        ({"holder": "h", "seconds": "5"}, "seconds must be a number"),
        ({"holder": "h", "seconds": True}, "seconds must be a number"),
        ({"holder": "h"}, "seconds must be a number"),
        ({"seconds": 5}, "holder must be a printable string"),
        ({"holder": "", "seconds": 5}, "holder must be a printable string"),
        ({"holder": "x" * 129, "seconds": 5}, "holder must be a printable string"),
        ([], "body must be a JSON object"),
    ],
)
async def test_a_worker_refuses_a_bad_pause(bare_cluster: Cluster, body: object, message: str) -> None:
    worker = await bare_cluster.start_worker("shard-1")
    status, answer = await _post(bare_cluster.session, worker_url(worker) + wire.INTERNAL_PAUSE_PATH, body)
    assert status == 400 and message in answer["message"], answer
    assert metric(worker, "dialogs_worker_writes_paused") == 0


async def test_only_proxies_may_pause_or_resume_a_worker(bare_cluster: Cluster) -> None:
    worker = await bare_cluster.start_worker("shard-1")
    calls = [(wire.INTERNAL_PAUSE_PATH, {"holder": "h", "seconds": 5}), (wire.INTERNAL_RESUME_PATH, {"holder": "h"})]
    for path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with bare_cluster.session.post(worker_url(worker) + path, json=body, headers=headers) as r:
                assert r.status == 401, await r.text()
    assert metric(worker, "dialogs_worker_writes_paused") == 0


async def test_a_worker_that_does_not_answer_is_counted_not_waited_for(bare_cluster: Cluster) -> None:
    worker = await bare_cluster.start_worker("shard-1")
    gone = "http://127.0.0.1:9"  # discard port: nothing listens
    async with (
        aiohttp.ClientSession() as session,
        writes_paused(session, [worker_url(worker), gone], INTERNAL_SECRET) as paused,
    ):
        assert (paused.workers, paused.paused) == (2, 1)
        assert metric(worker, "dialogs_worker_writes_paused") == 1
    assert metric(worker, "dialogs_worker_writes_paused") == 0


async def test_a_pause_waits_for_the_commit_in_flight(bare_cluster: Cluster) -> None:
    """A commit already running when the pause comes is let finish, and acknowledged; the
    pause answers only then. One still running past the drain bound is reported (the
    switchover then does not start) and the pause stands meanwhile."""
    cluster = bare_cluster
    shard_1 = await cluster.start_worker("shard-1")
    await cluster.start_worker("shard-2")
    await cluster.start_proxy()
    anna, anna_token = await cluster.api.user("Anna")
    peer, _ = await cluster.api.peer_whose_dialog_goes_to(anna, await cluster.active_map(), "shard-1")
    pause_url = worker_url(shard_1) + wire.INTERNAL_PAUSE_PATH
    async with commits_blocked(cluster.dsn("shard-1")):
        in_flight = asyncio.ensure_future(cluster.api.send(anna_token, peer, "in flight"))
        await until(lambda: _waiting_for_the_fence(cluster.dsn("shard-1")))  # the commit waits in its transaction
        pausing = asyncio.ensure_future(_post(cluster.session, pause_url, {"holder": "a", "seconds": 5}))
        await until(lambda: _paused(shard_1))
        await asyncio.sleep(0.3)
        assert not pausing.done() and not in_flight.done()
        # The drain bound, asked of the group commit itself: the commit is still running.
        assert await shard_1.app[GROUP_COMMIT].pause("b", 5, drain_timeout=0.2) is False  # type: ignore[index]
        assert metric(shard_1, "dialogs_worker_writes_paused") == 1
    assert await asyncio.wait_for(pausing, 5) == (200, {"drained": True})
    assert (await asyncio.wait_for(in_flight, 5)).status == 200
    assert await cluster.stored("in flight") == 1


async def test_one_switchover_does_not_end_another_ones_pause(bare_cluster: Cluster) -> None:
    worker = await bare_cluster.start_worker("shard-1")
    base, session = worker_url(worker), bare_cluster.session
    for holder in ("first", "second"):
        assert await _post(session, base + wire.INTERNAL_PAUSE_PATH, {"holder": holder, "seconds": 5}) == (
            200,
            {"drained": True},
        )
    assert await _post(session, base + wire.INTERNAL_RESUME_PATH, {"holder": "first"}) == (200, {"paused": True})
    assert metric(worker, "dialogs_worker_writes_paused") == 1
    assert await _post(session, base + wire.INTERNAL_RESUME_PATH, {"holder": "second"}) == (200, {"paused": False})
    assert metric(worker, "dialogs_worker_writes_paused") == 0
    # A renewal of an ended pause that arrives late (its sender gave up on it) pauses nothing.
    late = await _post(session, base + wire.INTERNAL_PAUSE_PATH, {"holder": "first", "seconds": 5})
    assert late == (200, {"drained": False})
    assert metric(worker, "dialogs_worker_writes_paused") == 0


@pytest.mark.parametrize(
    ("status", "promotes", "outcome"),
    [
        (412, False, "Patroni refused the switchover: no"),  # refused: nothing started
        (503, False, "Patroni answered 503"),  # unclear, and no new primary shows up
        (503, True, None),  # unclear, but the view shows the new primary: done
    ],
)
async def test_a_switchover_patroni_does_not_carry_out_leaves_no_worker_paused(
    bare_cluster: Cluster, status: int, promotes: bool, outcome: str | None
) -> None:
    """Patroni may refuse, or answer an error, after the workers paused (here a stand-in
    for its REST API, which a real group cannot be made to answer so on demand): the
    workers resume either way; only a new primary in the group's view is a success."""
    worker = await bare_cluster.start_worker("shard-1")
    asked: list[object] = []

    async def cluster_view(request: web.Request) -> web.Response:
        leader = "m-1" if promotes and asked else "m-0"
        members = [
            {"name": name, "role": "leader" if name == leader else "sync_standby", "state": "running"}
            for name in ("m-0", "m-1")
        ]
        members[0]["api_url"] = f"{base}/patroni"
        return web.json_response({"members": members})

    async def answer(request: web.Request) -> web.Response:
        asked.append(await request.json())
        assert metric(worker, "dialogs_worker_writes_paused") == 1  # paused before Patroni is asked
        return web.Response(status=status, text="no")

    patroni_api = web.Application()
    patroni_api.router.add_get("/cluster", cluster_view)
    patroni_api.router.add_post("/switchover", answer)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    runner = await start_site(patroni_api, port, idle_timeout=5)

    try:
        if outcome is None:
            done = await switchover([base], None, [worker_url(worker)], INTERNAL_SECRET)
            assert (done.old, done.new, done.paused) == ("m-0", "m-1", Paused(1, 1))
        else:
            error = errors.Conflict if status < 500 else errors.ShardUnavailable
            with pytest.raises(error, match=outcome):
                await switchover([base], None, [worker_url(worker)], INTERNAL_SECRET)
    finally:
        await runner.cleanup()
    assert asked == [{"leader": "m-0"}]
    assert metric(worker, "dialogs_worker_writes_paused") == 0


async def test_a_frozen_worker_stops_the_switchover_before_patroni_is_asked(
    bare_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that takes the pause and never answers (a frozen process: its kernel accepts
    the connection) may still be committing: the switchover does not start, Patroni is never
    asked, and the other workers' writes resume. (The drain bound is shortened from 15 s.)"""
    worker = await bare_cluster.start_worker("shard-1")
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    frozen = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    frozen_url = f"http://127.0.0.1:{frozen.sockets[0].getsockname()[1]}"
    asked: list[object] = []

    async def cluster_view(request: web.Request) -> web.Response:
        members = [
            {"name": "m-0", "role": "leader", "state": "running"},
            {"name": "m-1", "role": "sync_standby", "state": "streaming"},
        ]
        return web.json_response({"members": members})

    async def switch(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.Response(text="Successfully switched over")

    patroni_api = web.Application()
    patroni_api.router.add_get("/cluster", cluster_view)
    patroni_api.router.add_post("/switchover", switch)
    port = free_port()
    runner = await start_site(patroni_api, port, idle_timeout=5)
    monkeypatch.setattr(switchover_module, "_DRAIN_CALL", aiohttp.ClientTimeout(total=1, sock_connect=1))
    try:
        with pytest.raises(errors.ShardUnavailable, match="1 of the shard's workers still had a commit running"):
            await switchover([f"http://127.0.0.1:{port}"], None, [worker_url(worker), frozen_url], INTERNAL_SECRET)
    finally:
        await runner.cleanup()
        for writer in accepted:
            writer.close()
        frozen.close()
        await frozen.wait_closed()
    assert asked == []
    assert metric(worker, "dialogs_worker_writes_paused") == 0

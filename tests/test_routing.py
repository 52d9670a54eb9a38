"""Shard-map versions between proxy and worker: refusal of stale routing, and recovery."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import aiohttp
import asyncpg
import orjson
import pytest

from dialogs import errors, wire
from dialogs.keys import dialog_key
from dialogs.metastore import maps
from dialogs.shard_map import ShardMap
from proxy.appkeys import TOPOLOGY
from tests.support import INTERNAL_SECRET, Cluster, metric

_AS_PROXY = {"Authorization": f"Bearer {INTERNAL_SECRET}"}


async def _publish_next_map(cluster: Cluster) -> ShardMap:
    """Write the next map version with the same shards (a version bump that moves nothing)."""
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        current = await maps.active_map(con)
        assert current is not None
        bumped = current.next(current.weights)
        await maps.activate(con, bumped, reason="test")
        return bumped
    finally:
        await con.close()


async def _wait_worker_version(session: aiohttp.ClientSession, url: str, version: int) -> None:
    for _ in range(100):
        async with session.get(url + "/health") as response:
            if (await response.json())["map_version"] == version:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker {url} never loaded map version {version}")


def _worker_url(cluster: Cluster, shard_id: str) -> str:
    name = next(name for name in cluster.workers if name.startswith(f"{shard_id}@"))
    return "http://127.0.0.1:" + name.split("@")[1]


async def _two_message_dialog(cluster: Cluster) -> tuple[str, wire.ListQuery]:
    """Anna wrote Boris "one", then "two": the worker that holds the dialog, and Boris's
    list of it as a proxy routes it (request id "r-page")."""
    anna, token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    await cluster.api.send(token, boris, "one")
    await cluster.api.send(token, boris, "two")
    shard_map = cluster.proxies[0].app[TOPOLOGY].map
    assert shard_map is not None
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    query = wire.ListQuery(key, uuid.UUID(boris), uuid.UUID(anna), 2**63 - 1, 10, shard_map.map_version, "r-page")
    return _worker_url(cluster, shard_map.owner(key)), query


def _owned_by(shard_map: ShardMap, shard_id: str) -> tuple[str, str, int]:
    while True:
        a, b = uuid.uuid4(), uuid.uuid4()
        key = dialog_key(a, b)
        if shard_map.owner(key) == shard_id:
            return str(a), str(b), key


async def _send_batch(cluster: Cluster, url: str, items: list[dict[str, object]]) -> list[dict[str, object]]:
    """Items posted straight to a worker's batch endpoint, as a proxy would; their results."""
    async with cluster.session.post(url + wire.INTERNAL_BATCH_PATH, json=items, headers=_AS_PROXY) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_worker_refuses_an_older_map_version(cluster: Cluster) -> None:
    """Routed with version 1 after version 2 is active: 409 stale_map carrying the worker's version."""
    bumped = await _publish_next_map(cluster)
    url = _worker_url(cluster, "shard-1")
    await _wait_worker_version(cluster.session, url, bumped.map_version)
    a, b, key = _owned_by(bumped, "shard-1")
    body = {"dialog_key": key, "from": a, "to": b, "text": "stale", "idempotency_key": None, "map_version": 1}
    [error] = await _send_batch(cluster, url, [body])
    assert error["status"] == 409 and error["code"] == 40902 and error["map_version"] == bumped.map_version
    rows = await cluster.shard_fetch("shard-1", "SELECT count(*) FROM messages")
    assert rows[0][0] == 0


async def test_worker_refuses_a_dialog_it_does_not_own(cluster: Cluster) -> None:
    """A request for another shard's dialog, routed with the current map, is refused and not stored."""
    url = _worker_url(cluster, "shard-1")
    shard_map = cluster.proxies[0].app[TOPOLOGY].map
    assert shard_map is not None
    a, b, key = _owned_by(shard_map, "shard-2")
    body = {"dialog_key": key, "from": a, "to": b, "text": "misrouted", "idempotency_key": None}
    misrouted, unversioned = await _send_batch(cluster, url, [{**body, "map_version": shard_map.map_version}, body])
    assert misrouted["status"] == 409 and "not on this shard" in misrouted["message"]
    assert unversioned["status"] == 400 and "map_version" in unversioned["message"]
    rows = await cluster.shard_fetch("shard-1", "SELECT count(*) FROM messages")
    assert rows[0][0] == 0


async def test_a_mixed_batch_answers_each_send_on_its_own(cluster: Cluster) -> None:
    """Stored, malformed, stale, misrouted and a reused key in one batch: each its own answer,
    in its own place, with its own request id; only the good ones are stored."""
    shard_map = cluster.proxies[0].app[TOPOLOGY].map
    assert shard_map is not None
    version = shard_map.map_version
    url = _worker_url(cluster, "shard-1")
    a, b, key = _owned_by(shard_map, "shard-1")
    foreign_a, foreign_b, foreign = _owned_by(shard_map, "shard-2")
    ok = {
        "dialog_key": key,
        "from": a,
        "to": b,
        "text": "first",
        "idempotency_key": "k-1",
        "map_version": version,
        "request_id": "r-ok",
    }
    await _send_batch(cluster, url, [ok])
    items = [
        {**ok, "text": "second", "idempotency_key": "k-2", "request_id": "r-good"},
        "not an object",
        {**ok, "text": "stale", "idempotency_key": None, "map_version": version - 1, "request_id": "r-stale"},
        {
            **ok,
            "from": foreign_a,
            "to": foreign_b,
            "dialog_key": foreign,
            "idempotency_key": None,
            "request_id": "r-foreign",
        },
        {**ok, "text": "other text, same key", "request_id": "r-reused"},
        {**ok, "request_id": "r-replay"},
    ]
    good, malformed, stale, foreign_answer, reused, replay = await _send_batch(cluster, url, items)
    assert good["status"] == 200 and good["duplicate"] is False
    assert malformed["status"] == 400 and malformed["message"] == "body must be a JSON object"
    assert stale["status"] == 409 and stale["code"] == 40902 and stale["request_id"] == "r-stale"
    assert foreign_answer["status"] == 409 and "not on this shard" in foreign_answer["message"]
    assert foreign_answer["request_id"] == "r-foreign"
    assert reused["status"] == 422 and reused["request_id"] == "r-reused", reused
    assert replay["status"] == 200 and replay["duplicate"] is True
    rows = await cluster.shard_fetch("shard-1", "SELECT text FROM messages ORDER BY id")
    assert [row["text"] for row in rows] == ["first", "second"]


async def test_a_worker_refuses_what_the_public_api_refuses(cluster: Cluster) -> None:
    """The wire's checks are the public API's: a blank or NUL text, a key of the wrong pair,
    each a 400 of its own, with its own request id; nothing is stored."""
    shard_map = cluster.proxies[0].app[TOPOLOGY].map
    assert shard_map is not None
    url = _worker_url(cluster, "shard-1")
    a, b, key = _owned_by(shard_map, "shard-1")
    good = wire.SendItem(key, uuid.UUID(a), uuid.UUID(b), "ok", None, shard_map.map_version, "r").to_json()
    items = [
        {**good, "text": " \t ", "request_id": "r-blank"},
        {**good, "text": "a\x00b", "request_id": "r-nul"},
        {**good, "to": str(uuid.uuid4()), "request_id": "r-pair"},
        {**good, "text": "", "request_id": "line\nbreak"},  # an id the wire does not keep
    ]
    blank, nul, pair, unnamed = await _send_batch(cluster, url, items)
    assert unnamed["status"] == 400 and unnamed["request_id"] != "line\nbreak" and len(unnamed["request_id"]) == 32
    assert (blank["status"], blank["request_id"], blank["message"]) == (400, "r-blank", "text must not be empty")
    assert (nul["status"], nul["request_id"]) == (400, "r-nul") and "NUL" in nul["message"]
    assert (pair["status"], pair["request_id"]) == (400, "r-pair") and "dialog key" in pair["message"]
    rows = await cluster.shard_fetch("shard-1", "SELECT count(*) FROM messages")
    assert rows[0][0] == 0


async def test_a_list_on_the_wire_names_its_size_and_its_request(cluster: Cluster) -> None:
    """A page says how many messages it holds; a refused list answers with the client's request id."""
    url, query = await _two_message_dialog(cluster)
    async with cluster.session.get(url + wire.INTERNAL_MESSAGES_PATH + "?" + query.to_query(), headers=_AS_PROXY) as r:
        assert r.status == 200 and r.headers[wire.PAGE_COUNT_HEADER] == "2"
        assert [m["text"] for m in await r.json()] == ["two", "one"]
    stale = replace(query, map_version=0, request_id="r-stale").to_query()
    async with cluster.session.get(url + wire.INTERNAL_MESSAGES_PATH + "?" + stale, headers=_AS_PROXY) as r:
        body = await r.json()
        assert (r.status, body["code"], body["request_id"]) == (409, 40902, "r-stale")
        assert r.headers["X-Request-ID"] == "r-stale"
    # Refused before it is read (no secret): still under the client's request id.
    unauthorized = replace(query, request_id="r-no-secret").to_query()
    async with cluster.session.get(url + wire.INTERNAL_MESSAGES_PATH + "?" + unauthorized) as r:
        assert (r.status, (await r.json())["request_id"]) == (401, "r-no-secret")


async def test_a_batch_of_lists_answers_each_query_on_its_own(cluster: Cluster) -> None:
    """The batched channel for lists: each query its own page or its own error (a stale map,
    a query that is not one), under its own request id; no secret, no pages."""
    url, query = await _two_message_dialog(cluster)
    url += wire.INTERNAL_PAGES_PATH
    items = [
        query.to_json(),
        replace(query, map_version=0, request_id="r-stale").to_json(),
        {**query.to_json(), "limit": 0, "request_id": "r-limit"},
        replace(query, limit=1, request_id="r-one").to_json(),
    ]
    async with cluster.session.post(url, json=items, headers=_AS_PROXY) as r:
        assert r.status == 200
        page, stale, limit, one = wire.decode_pages(await r.read(), 4)
    assert isinstance(page, wire.Page) and page.count == 2
    assert [m["text"] for m in orjson.loads(page.body)] == ["two", "one"]
    assert isinstance(stale, errors.StaleMap) and stale.to_json("x")["code"] == 40902
    assert isinstance(limit, errors.InvalidInput) and "limit" in limit.message
    assert isinstance(one, wire.Page) and [m["text"] for m in orjson.loads(one.body)] == ["two"]
    async with cluster.session.post(url, json=items) as r:
        assert r.status == 401, await r.text()
    async with cluster.session.post(url, json=[], headers=_AS_PROXY) as r:
        assert r.status == 400 and "non-empty JSON array" in (await r.json())["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-secret", f"Basic {INTERNAL_SECRET}"])
async def test_worker_answers_only_proxies(cluster: Cluster, authorization: str | None) -> None:
    """Straight to a worker without the internal secret: 401, nothing stored, nothing listed."""
    anna, anna_token = await cluster.api.user("Anna")
    boris = await cluster.api.register("Boris")
    shard_map = cluster.proxies[0].app[TOPOLOGY].map
    assert shard_map is not None
    key = dialog_key(uuid.UUID(anna), uuid.UUID(boris))
    url = _worker_url(cluster, shard_map.owner(key))
    headers = {"Authorization": authorization} if authorization else {}
    forged = {
        "dialog_key": key,
        "from": boris,
        "to": anna,
        "text": "forged",
        "idempotency_key": None,
        "map_version": shard_map.map_version,
    }
    async with cluster.session.post(url + wire.INTERNAL_BATCH_PATH, json=[forged], headers=headers) as r:
        assert r.status == 401, await r.text()
    query = wire.ListQuery(key, uuid.UUID(anna), uuid.UUID(boris), 2**63 - 1, 10, shard_map.map_version, "r").to_query()
    async with cluster.session.get(url + wire.INTERNAL_MESSAGES_PATH + "?" + query, headers=headers) as r:
        assert r.status == 401, await r.text()
    assert (await cluster.api.list(anna_token, boris)).json == []


async def test_proxy_with_an_old_map_reloads_and_retries(cluster: Cluster) -> None:
    """A proxy that missed a map change is refused by the worker, reloads, retries: the client sees 200."""
    # A proxy of its own that polls the metadata database only once a minute: the map set
    # below stays until the worker's refusal makes it reload (with the fixture's proxy,
    # polling every 0.2 s, the watcher could restore the new map first, and the send
    # would then prove nothing).
    runner = await cluster.start_proxy(DIALOGS_POLL_INTERVAL="60")
    api = cluster.api_for(len(cluster.proxies) - 1)
    anna, token = await api.user("Anna")
    boris = await api.register("Boris")
    topology = runner.app[TOPOLOGY]
    old_map = topology.map
    bumped = await _publish_next_map(cluster)
    for shard_id in ("shard-1", "shard-2"):
        await _wait_worker_version(cluster.session, _worker_url(cluster, shard_id), bumped.map_version)
    await asyncio.sleep(0.2)  # the NOTIFY of version 2 has reached this proxy too, before the map is set back
    topology.map = old_map  # as if this proxy had not heard of version 2 yet

    reply = await api.send(token, boris, "routed with version 1")
    assert reply.status == 200
    assert topology.map_version == bumped.map_version
    retries = metric(runner, "dialogs_proxy_stale_map_retries_total")
    assert retries == 1
    assert [m["text"] for m in (await api.list(token, boris)).json] == ["routed with version 1"]


async def test_shard_map_writes_are_compare_and_swap(bare_cluster: Cluster) -> None:
    """Two writers of version 2: exactly one wins; a version that skips one is refused."""
    con_a = await asyncpg.connect(bare_cluster.metadata_dsn)
    con_b = await asyncpg.connect(bare_cluster.metadata_dsn)
    try:
        current = await maps.active_map(con_a)
        assert current is not None and current.map_version == 1
        outcomes = await asyncio.gather(
            maps.activate(con_a, current.with_weight("shard-1", 2), "test"),
            maps.activate(con_b, current.with_weight("shard-2", 3), "test"),
            return_exceptions=True,
        )
        assert sorted(type(outcome).__name__ for outcome in outcomes) == ["MapVersionConflict", "NoneType"]
        with pytest.raises(errors.MapVersionConflict):
            await maps.activate(con_a, ShardMap(5, current.weights), "test")  # skips versions
        assert (await maps.active_map(con_a)).map_version == 2  # type: ignore[union-attr]
    finally:
        await con_a.close()
        await con_b.close()


async def test_every_process_follows_a_64_shard_map_and_back(cluster: Cluster) -> None:
    """The capacity model's map (docs/capacity.md): a synthetic version of 64 shards (the two
    real ones keep their points on the ring, 2/64 of it) becomes active, and every worker and proxy
    routes by it within seconds (``bench.capacity --follow`` times it); the real map comes
    back as the next version, every process follows again, and dialogs go on as before."""
    api = cluster.api
    anna, token = await api.user("Anna")
    boris = await api.register("Boris")
    assert (await api.send(token, boris, "before")).status == 200
    real = await cluster.active_map()
    synthetic = real.next({**{f"shard-{number}": 1 for number in range(1, 65)}, **real.weights})
    back = synthetic.next(real.weights)
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        urls = [row["url"] for row in await con.fetch("SELECT url FROM workers UNION ALL SELECT url FROM proxies")]
        assert len(urls) == len(cluster.workers) + len(cluster.proxies)
        for version in (synthetic, back):
            await maps.activate(con, version, "test: a 64-shard map")
            async with asyncio.timeout(20):
                while True:
                    seen = []
                    for url in urls:
                        async with cluster.session.get(url + "/health") as reply:
                            seen.append((await reply.json())["map_version"])
                    if seen == [version.map_version] * len(urls):
                        break
                    await asyncio.sleep(0.02)
    finally:
        await con.close()
    assert (await api.send(token, boris, "after")).status == 200
    assert [m["text"] for m in (await api.list(token, boris)).json] == ["after", "before"]

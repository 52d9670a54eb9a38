"""The admin API: authentication, and clear 4xx answers to invalid requests."""

from __future__ import annotations

import asyncpg
import pytest

from tests.support import ADMIN_TOKEN, Cluster


def _error(reply, status: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert reply.status == status, reply.body
    assert fragment in reply.json["message"], reply.json


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        ({}, 401, "missing admin token"),
        ({"Authorization": "Bearer wrong-token-000000000"}, 401, "invalid admin token"),
        ({"Authorization": "Basic " + ADMIN_TOKEN}, 401, "must use the Bearer scheme"),
    ],
)
async def test_admin_api_needs_the_admin_token(
    cluster: Cluster, headers: dict[str, str], status: int, fragment: str
) -> None:
    """No token or a wrong one: 401 on every admin route."""
    for method, path in [
        ("GET", "/admin/shards"),
        ("GET", "/admin/map"),
        ("POST", "/admin/shards"),
        ("DELETE", "/admin/shards/shard-1"),
        ("GET", "/admin/migrations"),
    ]:
        _error(await cluster.api.request(method, path, headers=headers), status, fragment)


async def test_user_token_is_forbidden(cluster: Cluster) -> None:
    """A valid user token is not an admin token: 403."""
    _, token = await cluster.api.user("Eve")
    _error(await cluster.api.request("GET", "/admin/shards", token=token), 403, "user token")


async def test_admin_api_disabled_without_a_token(bare_cluster: Cluster) -> None:
    """With DIALOGS_ADMIN_TOKEN unset the admin API answers 403 to everyone."""
    for shard_id in ("shard-1", "shard-2"):
        await bare_cluster.start_worker(shard_id)
    await bare_cluster.start_proxy(DIALOGS_ADMIN_TOKEN="")
    _error(await bare_cluster.admin("GET", "/admin/shards"), 403, "disabled")


async def test_shards_and_map(cluster: Cluster) -> None:
    """The registry and the map, with shares of keys that add up."""
    shards = (await cluster.admin("GET", "/admin/shards")).json
    assert [s["shard_id"] for s in shards] == ["shard-1", "shard-2"]
    assert all(s["in_map"] and s["workers"] for s in shards)
    shard_map = (await cluster.admin("GET", "/admin/map")).json
    assert shard_map["map_version"] == 1
    assert sum(s["share"] for s in shard_map["shards"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"shard_id": "shard-1", "dsn": "postgresql://x@127.0.0.1:1/x"}, 409, "already in the shard map"),
        ({"shard_id": "Bad Name", "dsn": "postgresql://x@127.0.0.1:1/x"}, 400, "shard_id must start"),
        ({"shard_id": "shard-9"}, 400, "dsn must be a postgresql:// URL"),
        ({"shard_id": "shard-9", "dsn": "mysql://x"}, 400, "dsn must be a postgresql:// URL"),
        ({"shard_id": "shard-9", "dsn": "postgresql://nobody:secret@127.0.0.1:1/x"}, 400, "cannot connect"),
        ({"shard_id": "shard-9", "dsn": "postgresql://x@127.0.0.1:1/x", "weight": 0}, 400, "weight"),
        ({"shard_id": "shard-9", "dsn": "postgresql://x@127.0.0.1:1/x", "batch_size": 5}, 400, "batch_size"),
        ({"shard_id": 7, "dsn": "postgresql://x@127.0.0.1:1/x"}, 400, "shard_id must be a string"),
        (
            {"shard_id": "shard-9", "dsn": "postgresql://x@127.0.0.1:1/x", "patroni_urls": ["ftp://h:1"]},
            400,
            "patroni_urls must be a list of http(s)://host:port URLs",
        ),
    ],
)
async def test_invalid_shard_additions(cluster: Cluster, body: dict[str, object], status: int, fragment: str) -> None:
    """Duplicate names, bad names, bad or unreachable DSNs, bad weights: clear 4xx, nothing started."""
    reply = await cluster.admin("POST", "/admin/shards", body)
    _error(reply, status, fragment)
    assert "secret" not in reply.json["message"]  # DSN passwords are masked in messages
    assert (await cluster.admin("GET", "/admin/migrations")).json == []


async def test_invalid_removals_and_weights(cluster: Cluster) -> None:
    """Unknown shards are 404; an unchanged weight is 409; a bad weight 400."""
    _error(await cluster.admin("DELETE", "/admin/shards/shard-9"), 404, "not in the shard map")
    _error(await cluster.admin("PUT", "/admin/shards/shard-9/weight", {"weight": 2}), 404, "not in the shard map")
    _error(await cluster.admin("PUT", "/admin/shards/shard-1/weight", {"weight": 1}), 409, "already has weight")
    _error(await cluster.admin("PUT", "/admin/shards/shard-1/weight", {"weight": "2"}), 400, "weight")


async def test_removing_the_last_shard_is_refused(cluster: Cluster) -> None:
    """After shard-2 is drained away, shard-1 cannot be removed too."""
    removed = await cluster.admin("DELETE", "/admin/shards/shard-2")
    assert removed.status == 202
    assert (await cluster.wait_migration(removed.json["migration_id"]))["phase"] == "done"
    _error(await cluster.admin("DELETE", "/admin/shards/shard-1"), 409, "last shard")


async def test_one_migration_at_a_time(bare_cluster: Cluster) -> None:
    """While a migration runs, another is refused with 409 naming the running one."""
    for shard_id in ("shard-1", "shard-2"):
        await bare_cluster.start_worker(shard_id)
    await bare_cluster.start_proxy(DIALOGS_MIGRATION_DRIVER="false")  # nobody runs it: it stays active
    first = await bare_cluster.admin("PUT", "/admin/shards/shard-1/weight", {"weight": 2})
    assert first.status == 202
    second = await bare_cluster.admin("PUT", "/admin/shards/shard-2/weight", {"weight": 3})
    _error(second, 409, f"migration {first.json['migration_id']} is still running")
    _error(await bare_cluster.admin("DELETE", "/admin/shards/shard-2"), 409, "still running")


async def test_migration_lookups_and_throttle(bare_cluster: Cluster) -> None:
    """Unknown or malformed ids, throttle changes and their validation."""
    for shard_id in ("shard-1", "shard-2"):
        await bare_cluster.start_worker(shard_id)
    await bare_cluster.start_proxy(DIALOGS_MIGRATION_DRIVER="false")
    _error(await bare_cluster.admin("GET", "/admin/migrations/999"), 404, "no migration 999")
    _error(await bare_cluster.admin("GET", "/admin/migrations/abc"), 400, "must be an integer")
    _error(await bare_cluster.admin("POST", "/admin/migrations/999/abort"), 404, "no migration 999")
    started = await bare_cluster.admin("PUT", "/admin/shards/shard-1/weight", {"weight": 2, "rows_per_second": 50})
    migration_id = started.json["migration_id"]
    assert started.json["rows_per_second"] == 50
    changed = await bare_cluster.admin("PATCH", f"/admin/migrations/{migration_id}", {"rows_per_second": 0})
    assert changed.status == 200 and changed.json["rows_per_second"] == 0
    _error(
        await bare_cluster.admin("PATCH", f"/admin/migrations/{migration_id}", {"batch_size": 10}), 400, "batch_size"
    )


async def test_switchover_of_a_shard_that_cannot_have_one(cluster: Cluster) -> None:
    """A shard of one server has no standby to hand over to (409); an unknown shard is a 404;
    a bad body a 400. (tests/test_replicas.py switches a replicated shard over.)"""
    _error(await cluster.admin("POST", "/admin/shards/shard-1/switchover"), 409, "is not replicated")
    _error(await cluster.admin("POST", "/admin/shards/shard-9/switchover"), 404, "no shard shard-9")
    _error(await cluster.admin("POST", "/admin/shards/meta/switchover"), 409, "metadata database is not replicated")
    _error(await cluster.admin("POST", "/admin/shards/shard-1/switchover", {"to": 5}), 400, "to must be")


async def test_replication_of_a_cluster_of_single_servers_is_empty(cluster: Cluster) -> None:
    """`GET /admin/replication` names replicated databases only (tests/test_replicas.py and
    test_local_cluster.py show one); an unreachable member group shows its members down."""
    shown = await cluster.admin("GET", "/admin/replication")
    assert shown.status == 200 and shown.json == {}, shown.body
    gone = "http://127.0.0.1:9"  # nothing listens: the group's Patroni is unreachable
    await cluster.fetch_meta("UPDATE shards SET patroni_urls = $1 WHERE shard_id = 'shard-2'", [gone])
    shown = await cluster.admin("GET", "/admin/replication")
    assert shown.json == {
        "shard-2": [{"name": gone, "role": "down", "state": "unreachable", "timeline": None, "lag_bytes": None}]
    }, shown.body
    refused = await cluster.api.request("GET", "/admin/replication")
    assert refused.status == 401


async def test_discovery_names_every_registered_patroni_member(cluster: Cluster) -> None:
    """`GET /discovery/prometheus?role=patroni`: none on a cluster of single servers; once
    members are registered (a replicated shard added, the metadata group bootstrapped),
    each of them, a retired shard's excepted."""
    from dialogs.metastore import maps
    from proxy.bootstrap import upgrade_metadata

    async def targets() -> object:
        async with cluster.session.get(cluster.proxy_urls[0] + "/discovery/prometheus?role=patroni") as response:
            assert response.status == 200
            return await response.json()

    assert await targets() == []
    con = await asyncpg.connect(cluster.metadata_dsn)
    try:
        await maps.set_patroni_urls(con, "shard-1", ["http://10.0.0.1:8008", "http://10.0.0.2:8008"])
        # What `python -m proxy.bootstrap --metadata-patroni …` (without --shard) records.
        await upgrade_metadata(cluster.metadata_dsn, ["http://10.0.0.9:8008"])
        assert await targets() == [{"targets": ["10.0.0.1:8008", "10.0.0.2:8008", "10.0.0.9:8008"], "labels": {}}]
        await maps.retire_shard(con, "shard-1")
        assert await targets() == [{"targets": ["10.0.0.9:8008"], "labels": {}}]
        await maps.set_metadata_patroni_urls(con, ["https://10.0.0.9:8008", "http://10.0.0.8:8008"])
        assert await targets() == [  # Prometheus is told which to scrape over TLS
            {"targets": ["10.0.0.8:8008"], "labels": {}},
            {"targets": ["10.0.0.9:8008"], "labels": {"__scheme__": "https"}},
        ]
    finally:
        await con.close()
    _error(
        await cluster.admin(
            "POST",
            "/admin/shards",
            {"shard_id": "shard-3", "dsn": cluster.spare_dsns["shard-3"], "patroni_urls": ["ftp://x"]},
        ),
        400,
        "patroni_urls must be",
    )

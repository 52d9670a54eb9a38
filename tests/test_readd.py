"""A removed shard can be added back."""

from tests.support import Cluster


async def test_remove_then_add_back(bare_cluster: Cluster) -> None:
    """shard-3 joins, leaves, and joins again with the same database; every message stays readable."""
    cluster = bare_cluster
    for shard_id in ("shard-1", "shard-2", "shard-3"):
        await cluster.start_worker(shard_id)
    await cluster.start_proxy()
    api = cluster.api
    anna, token = await api.user("Anna")
    peers = [await api.register(f"P{i}") for i in range(30)]
    for peer in peers:
        assert (await api.send(token, peer, "hello")).status == 200
    dsn = cluster.spare_dsns["shard-3"]
    for method, path, body in [
        ("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": dsn}),
        ("DELETE", "/admin/shards/shard-3", None),
        ("POST", "/admin/shards", {"shard_id": "shard-3", "dsn": dsn}),
    ]:
        started = await cluster.admin(method, path, body)
        assert started.status == 202, started.body
        result = await cluster.wait_migration(started.json["migration_id"])
        assert result["phase"] == "done", result
        for peer in peers:
            assert [m["text"] for m in (await api.list(token, peer)).json] == ["hello"]

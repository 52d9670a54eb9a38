"""The course spec's flow, end to end through the proxy over two real shards."""

from __future__ import annotations

from tests.support import Cluster


async def test_spec_flow_both_directions_both_viewpoints(cluster: Cluster) -> None:
    """Two users register, log in, write to each other; each sees the same dialog, newest first."""
    api = cluster.api
    anna, anna_token = await api.user("Anna")
    boris, boris_token = await api.user("Boris")

    assert (await api.send(anna_token, boris, "Hi Boris")).status == 200
    assert (await api.send(boris_token, anna, "Hi Anna")).status == 200
    assert (await api.send(anna_token, boris, "How are you?")).status == 200

    from_anna = await api.list(anna_token, boris)
    from_boris = await api.list(boris_token, anna)
    assert from_anna.status == from_boris.status == 200
    assert from_anna.json == from_boris.json
    assert [(m["from"], m["to"], m["text"]) for m in from_anna.json] == [
        (anna, boris, "How are you?"),
        (boris, anna, "Hi Anna"),
        (anna, boris, "Hi Boris"),
    ]

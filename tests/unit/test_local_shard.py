"""When a refused local `shard add` may take back the server and worker it started."""

from __future__ import annotations

from dialogsctl.local_shard import refused, started_since


def test_only_a_4xx_proves_the_shard_was_not_taken() -> None:
    """4xx answers are decided before anything is written; a 5xx or no answer (0) proves nothing."""
    assert all(refused(status) for status in (400, 401, 403, 404, 409, 422))
    assert not any(refused(status) for status in (0, 500, 502, 503, 504))


def test_a_new_add_of_this_shard_means_it_was_taken() -> None:
    """After an unclear answer, an add migration of this shard not seen before means it was taken."""
    before = [{"migration_id": 4, "kind": "add", "shard_id": "shard-3"}]
    assert not started_since(before, "shard-3", known={4})
    assert not started_since([*before, {"migration_id": 5, "kind": "remove", "shard_id": "shard-3"}], "shard-3", {4})
    assert not started_since([*before, {"migration_id": 5, "kind": "add", "shard_id": "shard-4"}], "shard-3", {4})
    assert started_since([*before, {"migration_id": 5, "kind": "add", "shard_id": "shard-3"}], "shard-3", {4})

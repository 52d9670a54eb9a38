"""Which registered workers the proxy routes to."""

from __future__ import annotations

from dialogs.metastore.members import WorkerInfo
from proxy.topology import live_workers


def _worker(url: str, age: float, shard_id: str = "shard-1") -> WorkerInfo:
    return WorkerInfo(url, shard_id, url, 1, age)


def test_fresh_heartbeats_are_live_and_stale_ones_are_not() -> None:
    """Long connected: a heartbeat older than the TTL means the worker is gone."""
    workers = [_worker("a", 1.0), _worker("b", 11.0), _worker("c", 2.0, "shard-2")]
    assert live_workers(workers, ttl=10, healthy_for=100, previously_live={"a", "b"}) == {
        "shard-1": ["a"],
        "shard-2": ["c"],
    }


def test_after_a_metadata_outage_known_workers_stay_for_one_ttl() -> None:
    """Just reconnected: workers live before the outage stay; unknown stale ones do not."""
    workers = [_worker("a", 30.0), _worker("dead", 30.0)]
    assert live_workers(workers, ttl=10, healthy_for=0.5, previously_live={"a"}) == {"shard-1": ["a"]}
    assert live_workers(workers, ttl=10, healthy_for=10.5, previously_live={"a"}) == {}


def test_first_load_trusts_only_heartbeats() -> None:
    """A proxy that just started has no earlier view: stale registrations are skipped."""
    assert live_workers([_worker("a", 30.0)], ttl=10, healthy_for=0.1, previously_live=set()) == {}

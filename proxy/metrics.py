"""The proxy's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dialogs.http import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, RequestMetrics
from dialogs.shard_map import ShardMap
from dialogs.wire import Phase


class ShardCollector(Collector):
    """Per shard of the map this proxy routes by: dialogs_shard_share{shard_id}, its share of
    keys, and dialogs_shard_live_workers{shard_id}, the workers this proxy routes to for it
    (0: its dialogs answer 503; the alerts watch this, not scrapes, since a dead worker
    leaves discovery, and so Prometheus's targets, within seconds)."""

    def __init__(self, current: Callable[[], ShardMap | None], live_workers: Callable[[str], int]) -> None:
        self._current = current
        self._live_workers = live_workers
        self._cached: tuple[int, dict[str, float]] = (0, {})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        shares = GaugeMetricFamily("dialogs_shard_share", "Share of the key space per shard", labels=["shard_id"])
        workers = GaugeMetricFamily(
            "dialogs_shard_live_workers", "Live workers this proxy routes to, per shard of its map", labels=["shard_id"]
        )
        shard_map = self._current()
        if shard_map is not None:
            if self._cached[0] != shard_map.map_version:
                self._cached = (shard_map.map_version, shard_map.ring.shares())
            for shard_id, share in sorted(self._cached[1].items()):
                shares.add_metric([shard_id], share)
                workers.add_metric([shard_id], self._live_workers(shard_id))
        yield shares
        yield workers


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = RequestMetrics(self.registry, "dialogs_proxy")
        self.send_batch_size = Histogram(
            "dialogs_proxy_send_batch_size",
            "Sends carried by one proxy-to-worker batch request",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.send_batch_seconds = Histogram(
            "dialogs_proxy_send_batch_seconds",
            "Duration of one proxy-to-worker batch request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.list_batch_size = Histogram(
            "dialogs_proxy_list_batch_size",
            "List queries carried by one proxy-to-worker batch request",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.list_batch_seconds = Histogram(
            "dialogs_proxy_list_batch_seconds",
            "Duration of one proxy-to-worker batch request of list queries",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "dialogs_proxy_forward_seconds",
            "Latency of proxy-to-worker calls by shard",
            ["shard_id", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.forward_errors = Counter(
            "dialogs_proxy_forward_errors",
            "Failed proxy-to-worker calls by shard and reason (a 404 or 422 the worker answered is not one)",
            ["shard_id", "reason"],
            registry=self.registry,
        )
        self.stale_map_retries = Counter(
            "dialogs_proxy_stale_map_retries",
            "Requests retried because a worker had a newer shard map",
            registry=self.registry,
        )
        self.map_version = Gauge(
            "dialogs_proxy_map_version", "Shard-map version this proxy routes by", registry=self.registry
        )
        self.metadata_up = Gauge(
            "dialogs_proxy_metadata_up", "1 while the metadata database is reachable", registry=self.registry
        )

        self.buffered = Gauge(
            "dialogs_proxy_buffered_requests",
            "Requests waiting for a range in cutover (held here, then retried on the new owner)",
            registry=self.registry,
        )
        self.buffer_wait_seconds = Histogram(
            "dialogs_proxy_buffer_wait_seconds",
            "How long a buffered request waited for its range's cutover (the write pause clients see)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.failover_wait_seconds = Histogram(
            "dialogs_proxy_failover_wait_seconds",
            "How long a held request waited for its shard's database (a replicated shard failing or switching over)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0),
            registry=self.registry,
        )
        self.buffer_overflows = Counter(
            "dialogs_proxy_buffer_overflows",
            "Requests answered 503 because the buffer was full or the cutover took too long",
            registry=self.registry,
        )
        self.migration_phase = Gauge(
            "dialogs_migration_phase",
            "1 for the phase of the migration this proxy is running, 0 for the others",
            ["phase"],
            registry=self.registry,
        )
        for phase in Phase:
            self.migration_phase.labels(phase).set(0)
        self.migration_rows_copied = Gauge(
            "dialogs_migration_rows_copied", "Rows copied by the migration this proxy runs", registry=self.registry
        )
        self.migration_rows_remaining = Gauge(
            "dialogs_migration_rows_remaining",
            "Rows the migration this proxy runs has yet to copy (initial pass)",
            registry=self.registry,
        )
        self.cutover_seconds = Histogram(
            "dialogs_migration_cutover_seconds",
            "Freeze-to-flip duration of cutovers run by this proxy",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.cutover_failures = Counter(
            "dialogs_migration_cutover_failures",
            "Cutovers that gave the ranges back to their old owner (deadline or error)",
            registry=self.registry,
        )

    def observe_send_batch(self, size: int, seconds: float) -> None:
        self.send_batch_size.observe(size)
        self.send_batch_seconds.observe(seconds)

    def observe_list_batch(self, size: int, seconds: float) -> None:
        self.list_batch_size.observe(size)
        self.list_batch_seconds.observe(seconds)

    def observe_phase(self, phase: str) -> None:
        for name in Phase:
            self.migration_phase.labels(name).set(1 if name == phase else 0)

    def observe_rows(self, copied: int, remaining: int) -> None:
        self.migration_rows_copied.set(copied)
        self.migration_rows_remaining.set(remaining)

    def observe_cutover(self, seconds: float, ok: bool) -> None:
        self.cutover_seconds.observe(seconds)
        if not ok:
            self.cutover_failures.inc()

    def watch(
        self,
        map_version: Callable[[], float],
        metadata_up: Callable[[], float],
        current: Callable[[], ShardMap | None],
        live_workers: Callable[[str], int],
    ) -> None:
        self.map_version.set_function(map_version)
        self.metadata_up.set_function(metadata_up)
        self.registry.register(ShardCollector(current, live_workers))

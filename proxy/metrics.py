"""The proxy's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dialogs.http import LATENCY_BUCKETS, RequestMetrics


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = RequestMetrics(self.registry, "dialogs_proxy")
        self.forward_seconds = Histogram(
            "dialogs_proxy_forward_seconds",
            "Latency of proxy-to-worker calls by shard",
            ["shard_id", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.forward_errors = Counter(
            "dialogs_proxy_forward_errors",
            "Failed proxy-to-worker calls by shard and reason",
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

    def watch(self, map_version: Callable[[], float], metadata_up: Callable[[], float]) -> None:
        self.map_version.set_function(map_version)
        self.metadata_up.set_function(metadata_up)

"""The worker's Prometheus metrics, in a registry of its own (several apps share a test process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dialogs.http import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, RequestMetrics


class WorkerMetrics:
    def __init__(self, shard_id: str) -> None:
        self.registry = CollectorRegistry()
        self.http = RequestMetrics(self.registry, "dialogs_worker")
        self.batch_size = Histogram(
            "dialogs_worker_batch_size",
            "Sends committed together by one group-commit transaction",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "dialogs_worker_commit_seconds",
            "Duration of one group-commit transaction",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.query_seconds = Histogram(
            "dialogs_worker_query_seconds",
            "Shard database query latency by query",
            ["query"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.map_version = Gauge(
            "dialogs_worker_map_version", "Shard-map version this worker routes by", registry=self.registry
        )
        self.pool_connections = Gauge(
            "dialogs_worker_pool_connections",
            "Shard database connections by state",
            ["state"],
            registry=self.registry,
        )
        self.rows_estimate = Gauge(
            "dialogs_worker_rows_estimate",
            "Messages on this worker's shard (PostgreSQL's estimate, refreshed every 15 s)",
            registry=self.registry,
        )
        self.writes_paused = Gauge(
            "dialogs_worker_writes_paused",
            "1 while this worker's commits are paused for a switchover of its shard's primary",
            registry=self.registry,
        )
        self.inbox_backlog = Gauge(
            "dialogs_worker_inbox_backlog",
            "Rows in this shard's inbox outbox not applied yet (set by the worker that applies it, else 0)",
            registry=self.registry,
        )
        self.inbox_lag = Gauge(
            "dialogs_worker_inbox_lag_seconds",
            "Age of the oldest row in this shard's inbox outbox (set by the worker that applies it, else 0)",
            registry=self.registry,
        )
        self.inbox_applied = Counter(
            "dialogs_worker_inbox_applied",
            "Outbox rows whose dialog snapshot this worker applied to its users' inboxes",
            registry=self.registry,
        )
        self.inbox_read = Counter(
            "dialogs_worker_inbox_read",
            "Outbox rows this worker's applier read (a row that had to wait is counted each time it is read again)",
            registry=self.registry,
        )
        self.channels_open = Gauge(
            "dialogs_worker_channels_open", "Proxies' batch channels open to this worker", registry=self.registry
        )
        self.channels_opened = Counter(
            "dialogs_worker_channels_opened",
            "Proxies' batch channels this worker accepted (a steady climb: channels closing and reopening)",
            registry=self.registry,
        )
        self.info = Gauge(
            "dialogs_worker_info",
            "Constant 1, labelled with the shard this worker serves",
            ["shard_id"],
            registry=self.registry,
        )
        self.info.labels(shard_id).set(1)

    def observe_query(self, query: str, seconds: float) -> None:
        self.query_seconds.labels(query).observe(seconds)

    def observe_commit(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)

    def watch(self, map_version: Callable[[], float], in_use: Callable[[], float], idle: Callable[[], float]) -> None:
        """Read these at scrape time instead of updating them on every request."""
        self.map_version.set_function(map_version)
        self.pool_connections.labels("in_use").set_function(in_use)
        self.pool_connections.labels("idle").set_function(idle)

"""Worker settings, from DIALOGS_* environment variables (each declared with its help)."""

from __future__ import annotations

import environ

from dialogs import settings as s
from dialogs.shard_map import validate_shard_id


@environ.config(prefix=s.PREFIX, frozen=True)
class WorkerSettings:
    shard_id: str = s.converted(
        validate_shard_id,
        "a shard id (a lowercase letter, then lowercase letters, digits, '-' or '_')",
        help="the shard it serves",
    )
    shard_dsn: str = s.dsn(help="its shard database")
    metadata_dsn: str = s.dsn(help="the metadata database")
    internal_secret: str = s.secret(
        32, help="the proxies' secret; the internal API answers 401 without it (`/health`, `/metrics` stay open)"
    )
    host: str = s.text("127.0.0.1", help="listen address")
    port: int = s.port(8081, help="listen port")
    advertise_url: str = s.text("", help="the URL proxies use to reach it (empty: `http://HOST:PORT`)")
    worker_id: str = s.text("", help="its registration id (empty: `<shard>-<random>`)")
    log_level: str = s.log_level()
    # Longer than proxies keep idle connections to workers (30 s): a proxy never reuses a
    # connection the worker is closing (a send on it would be a 503).
    idle_timeout: float = s.positive_float(
        75.0, help="seconds an idle connection (or a proxy's batch channel) stays open; keep it above 30"
    )
    pool_min: int = s.positive_int(2, help="shard connections kept open")
    pool_max: int = s.positive_int(16, help="shard connections at most")
    batch_max: int = s.positive_int(256, help="group commit: sends one transaction may carry")
    flushers: int = s.positive_int(4, help="group commit: transactions in flight at once")
    heartbeat_interval: float = s.positive_float(1.0, help="seconds between registration heartbeats")
    poll_interval: float = s.positive_float(2.0, help="seconds between metadata polls (LISTEN/NOTIFY reacts at once)")
    query_timeout: float = s.positive_float(5.0, help="seconds per shard query")
    schema_until: int = s.count(
        0,
        help="benches only: stop the shard schema at this upgrade (0: the newest); below 7 the worker keeps no"
        " inboxes (bench/inbox.py measures sends without them)",
    )
    inbox_batch: int = s.positive_int(500, help="inbox applier: outbox rows applied together")
    inbox_poll_interval: float = s.positive_float(
        0.1,
        help="inbox applier: seconds between its passes over the outbox (a pass goes on while batches come full): "
        "about the inbox's delay",
    )

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

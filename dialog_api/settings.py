"""Worker settings, from DIALOGS_* environment variables."""

from __future__ import annotations

import environ

from dialogs.settings import dsn, internal_secret, port, positive_float, positive_int
from dialogs.shard_map import validate_shard_id


@environ.config(prefix="DIALOGS", frozen=True)
class WorkerSettings:
    shard_id: str = environ.var(validator=lambda _, __, value: validate_shard_id(value))
    shard_dsn: str = environ.var(converter=dsn("DIALOGS_SHARD_DSN"))
    metadata_dsn: str = environ.var(converter=dsn("DIALOGS_METADATA_DSN"))
    # Only callers that present it (the proxies) may use the internal API.
    internal_secret: str = environ.var(validator=internal_secret)
    host: str = environ.var("127.0.0.1")
    port: int = environ.var(8081, converter=port("DIALOGS_PORT"))
    # What proxies use to reach this worker; defaults to http://HOST:PORT.
    advertise_url: str = environ.var("")
    worker_id: str = environ.var("")
    # Longer than the proxies keep idle connections to workers (30 s), so that a proxy never
    # reuses a connection the worker is closing; a send on such a connection would be a 503.
    idle_timeout: float = environ.var(75.0, converter=positive_float("DIALOGS_IDLE_TIMEOUT"))
    pool_min: int = environ.var(2, converter=positive_int("DIALOGS_POOL_MIN"))
    pool_max: int = environ.var(16, converter=positive_int("DIALOGS_POOL_MAX"))
    # Group commit: how many sends one transaction may carry, and how many commit at once.
    batch_max: int = environ.var(256, converter=positive_int("DIALOGS_BATCH_MAX"))
    flushers: int = environ.var(4, converter=positive_int("DIALOGS_FLUSHERS"))
    heartbeat_interval: float = environ.var(1.0, converter=positive_float("DIALOGS_HEARTBEAT_INTERVAL"))
    poll_interval: float = environ.var(2.0, converter=positive_float("DIALOGS_POLL_INTERVAL"))
    query_timeout: float = environ.var(5.0, converter=positive_float("DIALOGS_QUERY_TIMEOUT"))

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

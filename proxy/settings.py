"""Proxy settings, from DIALOGS_* environment variables (each declared with its help)."""

from __future__ import annotations

import environ

from dialogs import settings as s
from dialogs import wire
from proxy.clients import Network, parse_networks

INTERNAL_SECRET_HELP = "≥ 32 characters, the same on every proxy and worker: workers answer only callers presenting it"


# Declared once, used by the proxies (which run migrations) and by a runner of its own.
def _cutover_deadline() -> float:
    return s.positive_float(
        5.0,
        help="seconds a cutover may take: the lease on frozen ranges, after which their old owner serves them"
        " again whatever the runner or the metadata database do",
    )


def _worker_ttl() -> float:
    return s.positive_float(
        10.0,
        help="seconds without a heartbeat before a worker gets no traffic (and a migration's cleanup"
        " stops waiting for a process)",
    )


@environ.config(prefix=s.PREFIX, frozen=True)
class ProxySettings:
    metadata_dsn: str = s.dsn(help="the metadata database (`postgresql://…`, password URL-encoded)")
    jwt_secret: str = s.secret(32, help="HS256 key for user tokens; share it with the monolith")
    internal_secret: str = s.secret(32, help=INTERNAL_SECRET_HELP)
    host: str = s.text("127.0.0.1", help="listen address")
    port: int = s.port(8080, help="listen port")
    advertise_host: str = s.text(
        "",
        help="the host name others (Prometheus, `dialogs status`) reach this proxy by, in its registration"
        " (empty: HOST)",
    )
    processes: int = s.positive_int(
        1, help="proxy processes sharing the listen port (`SO_REUSEPORT`), each a whole proxy on a core of its own"
    )
    process_port: int = s.count(
        0,
        help="with several processes, process i also listens alone on this port + i for /metrics"
        " (0: a free port); its registration names that URL",
    )
    process_stall_timeout: float = s.positive_float(
        5.0,
        help="with several processes, one whose event loop has not run for this many seconds (stopped,"
        " stuck) is killed and started again: it would keep getting its share of new connections",
    )
    admin_token: str = s.secret(16, "", empty_ok=True, help="admin API token; empty disables the admin API")
    log_level: str = s.log_level()
    jwt_ttl: int = s.positive_int(86400, help="user token lifetime, seconds")
    max_text_length: int = s.positive_int(
        4096, at_most=wire.MAX_TEXT_LENGTH, help=f"characters per message (at most {wire.MAX_TEXT_LENGTH})"
    )
    max_body_bytes: int = s.positive_int(65536, help="larger request bodies are a 413")
    idle_timeout: float = s.positive_float(
        15.0, help="seconds a connection may stay open without a request in progress (also bounds reading headers)"
    )
    write_timeout: float = s.positive_float(
        30.0, help="seconds a client has to read a large response (over 64 KiB) before its connection is closed"
    )
    forward_timeout: float = s.positive_float(5.0, help="seconds for one proxy→worker call")
    send_batch_max: int = s.positive_int(256, help="sends (or lists) one proxy→worker batch may carry")
    send_batches_in_flight: int = s.positive_int(
        1, help="batches of sends (and of lists) in flight to one worker at once"
    )
    worker_channels: bool = s.flag(
        True,
        help="carry batches to workers on persistent channels (WebSockets); off: one POST per batch",
    )
    worker_ttl: float = _worker_ttl()
    poll_interval: float = s.positive_float(2.0, help="seconds between metadata polls (LISTEN/NOTIFY reacts at once)")
    # A cutover gives up after 5 s and returns the range to its old owner, so 6 s covers it.
    cutover_wait: float = s.positive_float(6.0, help="seconds a request to a range in cutover may wait at the proxy")
    failover_wait: float = s.non_negative_float(
        0.0,
        help="seconds a request may wait while no worker of its shard reaches the shard's database (a replicated"
        " shard failing over); 0: a 503 at once, for shards of one server. `dialogs up --replicas` sets 30",
    )
    max_buffered: int = s.positive_int(
        10000, help="requests that may wait for a cutover or a failover at once; more get 503"
    )
    migration_driver: bool = s.flag(True, help="whether this proxy runs migrations (one at a time holds the lease)")
    cutover_deadline: float = _cutover_deadline()
    heartbeat_interval: float = s.positive_float(1.0, help="seconds between this proxy's registration heartbeats")
    proxy_id: str = s.text("", help="its registration id (empty: `proxy-<random>`)")
    # The defaults are argon2-cffi's (RFC 9106 low-memory profile).
    password_time_cost: int = s.positive_int(3, help="Argon2id time cost")
    password_memory_kib: int = s.positive_int(65536, help="Argon2id memory cost, KiB")
    password_concurrency: int = s.count(
        0, help="password hashes one process computes at once (0: CPUs ÷ processes, at least 1)"
    )
    password_wait: float = s.positive_float(
        2.0, help="seconds a login or registration waits for a hashing turn, then 503 with `Retry-After`"
    )
    login_failures_per_user: int = s.positive_int(
        5, help="failed logins allowed per user id from one client address within the window; then 429 for that address"
    )
    login_failures_per_user_total: int = s.positive_int(
        50,
        help="failed logins per user id from all addresses within the window; past it, an address that failed"
        " for that user gets 429 while others (the owner's) still have a right password accepted",
    )
    login_failures_per_address: int = s.positive_int(
        20, help="failed logins allowed per client address within the window; then 429"
    )
    login_failure_window: float = s.positive_float(60.0, help="the window of the login limits, seconds")
    trusted_proxies: tuple[Network, ...] = s.converted(
        parse_networks,
        "comma-separated IP addresses or networks",
        "",
        help="load balancers (addresses, CIDRs) whose `X-Forwarded-For` names the client",
    )


@environ.config(prefix=s.PREFIX, frozen=True)
class MigrationRunnerSettings:
    """`dialogs run-migration` (``python -m proxy.migration``): a runner of its own."""

    metadata_dsn: str = s.dsn(help="the metadata database")
    cutover_deadline: float = _cutover_deadline()
    worker_ttl: float = _worker_ttl()
    log_level: str = s.log_level()


@environ.config(prefix=s.PREFIX, frozen=True)
class BootstrapSettings:
    """`python -m proxy.bootstrap` (`dialogs bootstrap`): schemas and the first shard map."""

    metadata_dsn: str = s.dsn(help="the metadata database (or `--metadata-dsn`)")
    connect_wait: float = s.non_negative_float(
        0.0,
        help="seconds to keep trying a database that cannot be reached or has no primary yet (a replicated"
        " group electing one after a restart); 0: fail at once",
    )
    log_level: str = s.log_level()

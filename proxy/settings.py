"""Proxy settings, from DIALOGS_* environment variables."""

from __future__ import annotations

import os

import environ

from dialogs.settings import dsn, internal_secret, port, positive_float, positive_int
from proxy.login_guard import Network, parse_networks


def networks(name: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> tuple[Network, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_networks(str(value))
        except ValueError:
            raise ValueError(f"{name} must be comma-separated IP addresses or networks, got {value!r}") from None

    return convert


def _secret(_: object, __: object, value: str) -> None:
    if len(value) < 32:
        raise ValueError("DIALOGS_JWT_SECRET must be at least 32 characters (HS256 wants 256 bits)")


def _admin_token(_: object, __: object, value: str) -> None:
    if value and len(value) < 16:
        raise ValueError("DIALOGS_ADMIN_TOKEN must be at least 16 characters, or empty to disable the admin API")


@environ.config(prefix="DIALOGS", frozen=True)
class ProxySettings:
    metadata_dsn: str = environ.var(converter=dsn("DIALOGS_METADATA_DSN"))
    jwt_secret: str = environ.var(validator=_secret)
    # Proves to workers that a request comes from a proxy; the same on every proxy and worker.
    internal_secret: str = environ.var(validator=internal_secret)
    host: str = environ.var("127.0.0.1")
    port: int = environ.var(8080, converter=port("DIALOGS_PORT"))
    admin_token: str = environ.var("", validator=_admin_token)
    jwt_ttl: int = environ.var(86400, converter=positive_int("DIALOGS_JWT_TTL"))
    max_text_length: int = environ.var(4096, converter=positive_int("DIALOGS_MAX_TEXT_LENGTH"))
    max_body_bytes: int = environ.var(65536, converter=positive_int("DIALOGS_MAX_BODY_BYTES"))
    # An open connection with no request in progress (never sent one, or is trickling its
    # headers in byte by byte, or sits idle after a response) is closed after this long.
    idle_timeout: float = environ.var(15.0, converter=positive_float("DIALOGS_IDLE_TIMEOUT"))
    forward_timeout: float = environ.var(5.0, converter=positive_float("DIALOGS_FORWARD_TIMEOUT"))
    # A worker whose last heartbeat is older than this gets no traffic.
    worker_ttl: float = environ.var(10.0, converter=positive_float("DIALOGS_WORKER_TTL"))
    poll_interval: float = environ.var(2.0, converter=positive_float("DIALOGS_POLL_INTERVAL"))
    # Requests to a range in cutover wait (buffered here) at most this long; a cutover
    # gives up after 5 s and returns the range to its old owner, so 6 s covers it.
    cutover_wait: float = environ.var(6.0, converter=positive_float("DIALOGS_CUTOVER_WAIT"))
    max_buffered: int = environ.var(10000, converter=positive_int("DIALOGS_MAX_BUFFERED"))
    # Whether this proxy runs migrations (any proxy may; one at a time holds the lease).
    migration_driver: bool = environ.bool_var(True, name="DIALOGS_MIGRATION_DRIVER")
    cutover_deadline: float = environ.var(5.0, converter=positive_float("DIALOGS_CUTOVER_DEADLINE"))
    heartbeat_interval: float = environ.var(1.0, converter=positive_float("DIALOGS_HEARTBEAT_INTERVAL"))
    proxy_id: str = environ.var("")
    # Argon2id cost. The defaults are argon2-cffi's (RFC 9106 low-memory profile).
    password_time_cost: int = environ.var(3, converter=positive_int("DIALOGS_PASSWORD_TIME_COST"))
    password_memory_kib: int = environ.var(65536, converter=positive_int("DIALOGS_PASSWORD_MEMORY_KIB"))
    # Password hashes computed at once (default: one per CPU); a login waits this long for a turn, then 503.
    password_concurrency: int = environ.var(
        os.cpu_count() or 1, converter=positive_int("DIALOGS_PASSWORD_CONCURRENCY")
    )
    password_wait: float = environ.var(2.0, converter=positive_float("DIALOGS_PASSWORD_WAIT"))
    # Failed logins allowed per user id and per client address within the window; then 429.
    login_failures_per_user: int = environ.var(5, converter=positive_int("DIALOGS_LOGIN_FAILURES_PER_USER"))
    login_failures_per_address: int = environ.var(
        20, converter=positive_int("DIALOGS_LOGIN_FAILURES_PER_ADDRESS")
    )
    login_failure_window: float = environ.var(60.0, converter=positive_float("DIALOGS_LOGIN_FAILURE_WINDOW"))
    # Peers whose X-Forwarded-For names the client (the load balancer), as addresses or CIDRs.
    trusted_proxies: tuple[Network, ...] = environ.var("", converter=networks("DIALOGS_TRUSTED_PROXIES"))


@environ.config(prefix="DIALOGS", frozen=True)
class MigrationRunnerSettings:
    """`dialogs run-migration`: the proxies' migration settings, for a runner of its own."""

    metadata_dsn: str = environ.var(converter=dsn("DIALOGS_METADATA_DSN"))
    cutover_deadline: float = environ.var(5.0, converter=positive_float("DIALOGS_CUTOVER_DEADLINE"))
    # Cleanup waits for every process whose heartbeat is younger than this.
    worker_ttl: float = environ.var(10.0, converter=positive_float("DIALOGS_WORKER_TTL"))

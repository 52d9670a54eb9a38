"""Proxy settings, from DIALOGS_* environment variables."""

from __future__ import annotations

import environ

from dialogs.settings import dsn, internal_secret, port, positive_float, positive_int


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

"""Run one service process (a proxy or a worker) from its DIALOGS_* settings.

``python -m proxy`` and ``python -m dialog_api`` (and `dialogs proxy` / `dialogs worker`)
end here: settings are loaded and checked first, so a bad deployment exits with status 2
and one sentence naming the variable instead of a traceback.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from aiohttp import web

from dialogs import logs
from dialogs.http import LINGERING_SECONDS
from dialogs.settings import SettingsError, load


class ServiceSettings(Protocol):
    host: str
    port: int
    idle_timeout: float
    log_level: str


S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")


def settings_or_exit(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """The settings of ``cls`` from the environment, or exit 2 with the reason."""
    try:
        return load(cls, environ)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


def serve(cls: type[S], create_app: Callable[[S], web.Application], service: str) -> None:
    settings = settings_or_exit(cls)
    run(settings, create_app(settings), service)


def run(
    settings: ServiceSettings,
    app: web.Application,
    service: str,
    sockets: Sequence[socket.socket] | None = None,
    process: int | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT: on HOST:PORT, or on ``sockets`` when given
    (``process``: which of several processes this is, for the logs)."""
    logs.configure(service, settings.log_level, process)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        pass
    where: dict[str, object] = {"sock": list(sockets)} if sockets else {"host": settings.host, "port": settings.port}
    web.run_app(
        app,
        print=None,
        access_log=None,
        shutdown_timeout=10,
        keepalive_timeout=settings.idle_timeout,
        lingering_time=LINGERING_SECONDS,
        **where,  # type: ignore[arg-type]  # host/port or sock: run_app takes either, its stubs one set
    )

"""Several proxy processes on one port (``DIALOGS_PROCESSES``), so the proxy tier uses every core.

One proxy process is one Python interpreter: it cannot use more than one core, and under
send load it is the first part of the service to saturate one. With ``DIALOGS_PROCESSES=N``
the process started as ``python -m proxy`` becomes a small parent that forks N proxy
processes. Each binds the listen port with ``SO_REUSEPORT``, so the kernel spreads new
connections over them; each is a whole proxy (its own metadata watcher, batcher, pools,
login limits) registered under ``<id>-<i>``. Each also listens on a port of its own
(``DIALOGS_PROCESS_PORT`` + i, or a free port) and registers that URL, which reaches
exactly that process: Prometheus scrapes each one's /metrics there.

The parent forwards SIGTERM/SIGINT to its children and waits for them; a child that dies
is started again after a backoff (a child that exits 2, a configuration error, ends them
all: starting it again cannot help).

A child that is alive but not serving (stopped by SIGSTOP, its event loop stuck) would
keep its share of new connections, which the kernel hands out by socket whatever the
process does with them. So each child's event loop writes a byte to a pipe every
``HEARTBEAT_SECONDS``; a child silent for ``DIALOGS_PROCESS_STALL_TIMEOUT`` seconds is
killed (SIGKILL reaches a stopped process too) and started again like one that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from dialogs import logs
from dialogs.aio import background
from dialogs.serve import run, settings_or_exit
from proxy.app import create_app
from proxy.settings import ProxySettings

log = logging.getLogger(__name__)

# A child that ran this long before dying is restarted at once; sooner, after a backoff.
STABLE_SECONDS = 10.0
MAX_BACKOFF = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.1
HEARTBEAT_SECONDS = 0.25
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def check_port_free(host: str, port: int) -> None:
    """Exit 2 when HOST:PORT is taken: SO_REUSEPORT would otherwise share it with a stranger."""
    _listen(host, port).close()


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket, or exit 2 with the reason (a configuration error, not a crash)."""
    try:
        return socket.create_server((host, port), reuse_port=reuse_port, backlog=1024)
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        print(f"configuration error: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        sys.exit(2)


def _die_with(parent: int) -> None:
    """Have the kernel stop this child if its parent dies, even by SIGKILL (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


def _child(settings: ProxySettings, index: int, proxy_id: str, heartbeat: int) -> None:
    shared = _listen(settings.host, settings.port, reuse_port=True)
    own = _listen(settings.host, settings.process_port + index if settings.process_port else 0)
    own_url = f"http://{settings.advertise_host or settings.host}:{own.getsockname()[1]}"
    app = create_app(settings, own_url=own_url, proxy_id=f"{proxy_id}-{index}")
    app.cleanup_ctx.append(_beating(heartbeat))
    run(settings, app, "proxy", sockets=[shared, own], process=index)


def _beating(fd: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that writes to the parent's pipe from this process's event loop, so
    the beats stop when the loop does (a stopped process, a loop stuck in a call)."""

    async def beat(app: web.Application) -> AsyncIterator[None]:
        async def forever() -> None:
            while True:
                with contextlib.suppress(BlockingIOError):  # the parent is behind: one beat is enough
                    os.write(fd, b".")
                await asyncio.sleep(HEARTBEAT_SECONDS)

        async with background(forever()):
            yield

    return beat


class Parent:
    """Starts the children, restarts any that die, stops them all on SIGTERM/SIGINT."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        # One id for the group: a restarted child registers under the name it had.
        self.proxy_id = settings.proxy_id or f"proxy-{uuid.uuid4().hex[:8]}"
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, started at)
        self.stopping = False
        self.beats: dict[int, int] = {}  # pid -> read end of its heartbeat pipe
        self.last_beat: dict[int, float] = {}  # pid -> when it last beat (none yet: still starting)

    def _start(self, index: int) -> None:
        if self.stopping:
            return
        parent = os.getpid()
        # Signals wait until the child is in self.children (so _stop reaches it) and, in the
        # child, until its own handlers are back to the defaults.
        readable, writable = os.pipe()
        os.set_blocking(readable, False)
        os.set_blocking(writable, False)
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the child: a proxy of its own from here on
                code = 1
                try:
                    os.close(readable)
                    for other in self.beats.values():  # the other children's pipes are not ours
                        os.close(other)
                    for signum in _STOP_SIGNALS:
                        signal.signal(signum, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                    _die_with(parent)
                    _child(self.settings, index, self.proxy_id, writable)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    log.exception("proxy process %d failed", index)
                finally:
                    os._exit(code)
            os.close(writable)
            self.children[pid] = (index, time.monotonic())
            self.beats[pid] = readable
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _listen_for_beats(self, timeout: float) -> None:
        """Wait up to ``timeout`` for heartbeats, note who beat, and kill any child that has
        beaten before but not for the stall timeout (it is then reaped and restarted)."""
        ready, _, _ = select.select(list(self.beats.values()), [], [], timeout) if self.beats else ([], [], [])
        now = time.monotonic()
        for pid, fd in self.beats.items():
            if fd in ready:
                with contextlib.suppress(BlockingIOError):
                    if os.read(fd, 4096):
                        self.last_beat[pid] = now
        if self.stopping:
            return
        for pid, last in list(self.last_beat.items()):
            if now - last > self.settings.process_stall_timeout:
                index, _ = self.children[pid]
                log.error(
                    "proxy process %d (pid %d) has not served for %.1f s (stopped or stuck); killing it",
                    index,
                    pid,
                    now - last,
                )
                del self.last_beat[pid]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _forget(self, pid: int) -> None:
        os.close(self.beats.pop(pid))
        self.last_beat.pop(pid, None)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._stop)
        for index in range(self.settings.processes):
            self._start(index)
        log.info("started %d proxy processes on %s:%d", self.settings.processes, self.settings.host, self.settings.port)
        failures: dict[int, int] = {}
        restarts: dict[int, float] = {}  # index -> when to start it again
        result = 0
        while self.children or (restarts and not self.stopping):
            for index, due in list(restarts.items()):
                if due <= time.monotonic():
                    del restarts[index]
                    self._start(index)
            # Polled rather than blocking in wait(), so a stop during a backoff is seen at once.
            pid, status = os.waitpid(-1, os.WNOHANG) if self.children else (0, 0)
            if pid == 0:
                self._listen_for_beats(POLL_SECONDS)
                continue
            index, started = self.children.pop(pid)
            self._forget(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            if code == 2:
                log.error("proxy process %d exited with a configuration error; stopping the others", index)
                result = 2
                self._stop(signal.SIGTERM, None)
                continue
            ran = time.monotonic() - started
            failures[index] = 0 if ran >= STABLE_SECONDS else failures.get(index, 0) + 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** failures[index]) if failures[index] else 0.0
            log.warning(
                "proxy process %d exited (%s) after %.1f s; starting it again in %.1f s", index, code, ran, delay
            )
            restarts[index] = time.monotonic() + delay
        return result


def prefork(settings: ProxySettings) -> int:
    logs.configure("proxy", settings.log_level)
    last = settings.process_port + settings.processes - 1
    if settings.process_port and last > 65535:
        print(
            f"configuration error: DIALOGS_PROCESS_PORT + DIALOGS_PROCESSES - 1 = {last} is not a TCP port",
            file=sys.stderr,
        )
        return 2
    check_port_free(settings.host, settings.port)
    return Parent(settings).run()


def main() -> int:
    """`python -m proxy` and `dialogs proxy`: the settings decide one process or several."""
    settings = settings_or_exit(ProxySettings)
    if settings.processes == 1:
        run(settings, create_app(settings), "proxy")
        return 0
    return prefork(settings)

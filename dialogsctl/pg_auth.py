"""Password authentication for the local PostgreSQL servers.

Every server accepts only TCP connections from the loopback, and only with the superuser's
password (SCRAM-SHA-256): any local user could otherwise connect as ``postgres``. New data
directories get it from initdb (``--auth=scram-sha-256 --pwfile``); one made by an earlier
version (``trust``) is recognised by a ``pg_hba.conf`` other than ours, and gets the
password set in single-user mode before its first start with ours.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

SUPERUSER = "postgres"

HBA = """\
# Written by dialogs (dialogsctl/pg_auth.py); rewritten if changed.
# TCP from the loopback only, with a password. No Unix socket is opened.
host    all    all    127.0.0.1/32    scram-sha-256
host    all    all    ::1/128         scram-sha-256
"""


def dsn(port: int, password: str, database: str = "postgres") -> str:
    """The superuser's DSN on 127.0.0.1:``port``; the password is URL-quoted."""
    return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"


def group_dsn(ports: list[int], password: str, database: str = "postgres") -> str:
    """The superuser's DSN naming every server of a replicated group on 127.0.0.1: clients
    connect to whichever is the primary (``dialogs.pg.connect``)."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@{hosts}/{database}?target_session_attrs=read-write"


def redacted(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (for terminals and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def has_our_hba(pgdata: Path) -> bool:
    try:
        return (pgdata / "pg_hba.conf").read_text() == HBA
    except FileNotFoundError:
        return False


def write_hba(pgdata: Path, user: pwd.struct_passwd | None) -> None:
    path = pgdata / "pg_hba.conf"
    path.write_text(HBA)
    path.chmod(0o600)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


@contextlib.contextmanager
def password_file(password: str, folder: Path, user: pwd.struct_passwd | None) -> Iterator[Path]:
    """The password in a 0600 file in ``folder`` readable by ``user`` (initdb's --pwfile), removed after."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".pwfile-")
    path = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)
        yield path
    finally:
        path.unlink(missing_ok=True)


def set_password_single_user(postgres: Path, pgdata: Path, password: str, user: pwd.struct_passwd | None) -> None:
    """Give the superuser ``password`` on a stopped server (single-user mode: no connection needed)."""
    literal = password.replace("'", "''")
    result = subprocess.run(
        [str(postgres), "--single", "-D", str(pgdata), "-c", "log_statement=none", "postgres"],
        input=f"ALTER ROLE {SUPERUSER} PASSWORD '{literal}'\n",
        capture_output=True,
        text=True,
        user=user.pw_name if user is not None else None,
        cwd="/",
    )
    if result.returncode != 0 or "ERROR" in result.stdout + result.stderr:
        raise RuntimeError(f"could not set the password on {pgdata}:\n{result.stderr or result.stdout}")

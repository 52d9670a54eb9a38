"""The local cluster's layout on disk: one data folder, one ``cluster.json`` describing it.

``cluster.json`` is written on the first ``dialogs up`` and reused after, so ports,
secrets and DSNs stay the same across restarts and ``dialogs status`` can find it all.
It holds every secret of the local cluster (mode 0600): the JWT secret, the admin token,
the proxies' and workers' shared internal secret, and each PostgreSQL server's password.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dialogs.shard_map import validate_shard_id
from dialogsctl.net import free_port
from dialogsctl.pg_auth import dsn, group_dsn

STATE_FILE = "cluster.json"
EDIT_LOCK = "cluster.json.lock"
DATABASE = "dialogs"

_GENERATED_NAME = re.compile(r"shard-([0-9]+)")


def new_password() -> str:
    """A server password: URL-safe, so DSNs stay readable (they are URL-quoted all the same)."""
    return secrets.token_urlsafe(24)


def new_internal_secret() -> str:
    return secrets.token_urlsafe(32)


def next_shard_id(existing: Iterable[str]) -> str:
    """``shard-N`` after the highest ``shard-N`` in ``existing``; other names (``eu-db-2``) do
    not take part, since only names of this form can collide with the ones made here."""
    numbers = [int(match[1]) for name in existing if (match := _GENERATED_NAME.fullmatch(name))]
    return f"shard-{max(numbers, default=0) + 1}"


@dataclass
class ShardLayout:
    shard_id: str
    pg_port: int
    worker_port: int
    # Removed from the cluster by a finished migration: its server and worker stay stopped.
    retired: bool = False
    pg_password: str = field(default_factory=new_password)
    # A replicated shard: (PostgreSQL port, Patroni REST port) of each member, the first
    # bootstrapped as primary. Empty: one server on pg_port.
    members: list[list[int]] = field(default_factory=list)


@dataclass
class ClusterLayout:
    data_dir: Path
    proxy_port: int
    meta_port: int
    jwt_secret: str
    admin_token: str
    shards: list[ShardLayout] = field(default_factory=list)
    prometheus_port: int | None = None
    meta_password: str = field(default_factory=new_password)
    # Sent by proxies to workers (DIALOGS_INTERNAL_SECRET), so a worker serves proxies only.
    internal_secret: str = field(default_factory=new_internal_secret)
    # Replicated servers (`dialogs up --replicas N`): standbys per group, etcd's client and
    # peer ports, the metadata group's members, the replication user's password.
    replicas: int = 0
    etcd_ports: list[int] = field(default_factory=list)
    meta_members: list[list[int]] = field(default_factory=list)
    replication_password: str = field(default_factory=new_password)

    @property
    def metadata_dsn(self) -> str:
        if self.meta_members:
            return group_dsn([port for port, _ in self.meta_members], self.meta_password, DATABASE)
        return dsn(self.meta_port, self.meta_password, DATABASE)

    def shard_dsn(self, shard: ShardLayout, database: str = DATABASE) -> str:
        if shard.members:
            return group_dsn([port for port, _ in shard.members], shard.pg_password, database)
        return dsn(shard.pg_port, shard.pg_password, database)

    def members(self, name: str) -> list[list[int]]:
        """The (PostgreSQL port, Patroni REST port) pairs of group ``name`` (``meta`` or a shard)."""
        if name == "meta":
            return self.meta_members
        shard = self.shard(name)
        return shard.members if shard is not None else []

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_ports[0]}"

    def _new_members(self) -> list[list[int]]:
        return [[free_port(), free_port()] for _ in range(self.replicas + 1)] if self.replicas else []

    def server_password(self, name: str) -> str:
        """The password of server ``name`` (``meta`` or a shard id)."""
        if name == "meta":
            return self.meta_password
        shard = self.shard(name)
        if shard is None:
            raise KeyError(name)
        return shard.pg_password

    def pg_dir(self, name: str) -> Path:
        return self.data_dir / "pg" / name

    def log_file(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def save(self) -> None:
        data = asdict(self)
        data["data_dir"] = str(self.data_dir)
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        # 0600 from its creation on: it holds every secret of the cluster.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a .tmp left by a crash keeps its old mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, data_dir: Path) -> ClusterLayout | None:
        path = data_dir / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        lacks_secrets = not {"meta_password", "internal_secret"} <= data.keys() or any(
            "pg_password" not in shard for shard in data["shards"]
        )
        data["data_dir"] = data_dir
        data["shards"] = [ShardLayout(**shard) for shard in data["shards"]]
        layout = cls(**data)
        if lacks_secrets:
            # Written by an earlier version: the secrets just generated must be the ones
            # every later reader sees (the servers get their passwords on the next start).
            layout.save()
        return layout

    @classmethod
    @contextlib.contextmanager
    def edit(cls, data_dir: Path) -> Iterator[ClusterLayout | None]:
        """Read, change and write ``cluster.json`` as one step: commands that change it (two
        `dialogs shard add` at once, say) take turns, so neither writes over the other's
        change nor picks the name the other just took. Saved when the block ends normally."""
        if not (data_dir / STATE_FILE).exists():
            yield None  # no local cluster here (a remote one, reached with --url)
            return
        fd = os.open(data_dir / EDIT_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also if the process dies
            layout = cls.load(data_dir)
            yield layout
            if layout is not None:
                layout.save()
        finally:
            os.close(fd)

    @property
    def active_shards(self) -> list[ShardLayout]:
        return [shard for shard in self.shards if not shard.retired]

    def forget_shard(self, shard_id: str) -> None:
        self.shards = [shard for shard in self.shards if shard.shard_id != shard_id]

    def shard(self, shard_id: str) -> ShardLayout | None:
        return next((shard for shard in self.shards if shard.shard_id == shard_id), None)

    def add_shard(self, shard_id: str | None = None) -> ShardLayout:
        """A new shard with fresh ports (``shard-N`` after the highest N when no name is given).

        Its data folder must not exist yet: a new shard starts empty, with a new password,
        and a refused ``shard add`` may then delete that folder as its own.
        """
        pg_root = self.data_dir / "pg"
        folders = [path.name for path in pg_root.iterdir()] if pg_root.is_dir() else []
        if shard_id is None:
            shard_id = next_shard_id([*(shard.shard_id for shard in self.shards), *folders])
        validate_shard_id(shard_id)  # also keeps the name a plain folder name under pg/
        if self.shard(shard_id) is not None:
            raise ValueError(f"the local cluster already has a shard named {shard_id}")
        if shard_id in folders:
            raise ValueError(f"{self.pg_dir(shard_id)} already exists: remove it, or choose another name")
        shard = ShardLayout(shard_id, free_port(), free_port(), members=self._new_members())
        self.shards.append(shard)
        return shard

    @classmethod
    def create(cls, data_dir: Path, proxy_port: int, shard_count: int, replicas: int = 0) -> ClusterLayout:
        layout = cls(
            data_dir=data_dir,
            proxy_port=proxy_port,
            meta_port=free_port(),
            jwt_secret=secrets.token_urlsafe(48),
            admin_token=secrets.token_urlsafe(32),
            replicas=replicas,
        )
        if replicas:
            layout.etcd_ports = [free_port(), free_port()]
            layout.meta_members = layout._new_members()
        for index in range(1, shard_count + 1):
            layout.shards.append(ShardLayout(f"shard-{index}", free_port(), free_port(), members=layout._new_members()))
        return layout

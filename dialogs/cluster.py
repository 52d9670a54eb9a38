"""The local cluster's layout on disk: one data folder, one ``cluster.json`` describing it.

``cluster.json`` is written on the first ``dialogs up`` and reused after, so ports,
secrets and DSNs stay the same across restarts and ``dialogs status`` can find it all.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dialogs.embedded import free_port

STATE_FILE = "cluster.json"
DATABASE = "dialogs"

_GENERATED_NAME = re.compile(r"shard-([0-9]+)")


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


@dataclass
class ClusterLayout:
    data_dir: Path
    proxy_port: int
    meta_port: int
    jwt_secret: str
    admin_token: str
    shards: list[ShardLayout] = field(default_factory=list)
    prometheus_port: int | None = None

    @property
    def metadata_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.meta_port}/{DATABASE}"

    def shard_dsn(self, shard: ShardLayout) -> str:
        return f"postgresql://postgres@127.0.0.1:{shard.pg_port}/{DATABASE}"

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
        tmp.write_text(json.dumps(data, indent=2))
        tmp.chmod(0o600)  # it holds the JWT secret and the admin token
        os.replace(tmp, path)

    @classmethod
    def load(cls, data_dir: Path) -> ClusterLayout | None:
        path = data_dir / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["data_dir"] = data_dir
        data["shards"] = [ShardLayout(**shard) for shard in data["shards"]]
        return cls(**data)

    @property
    def active_shards(self) -> list[ShardLayout]:
        return [shard for shard in self.shards if not shard.retired]

    def shard(self, shard_id: str) -> ShardLayout | None:
        return next((shard for shard in self.shards if shard.shard_id == shard_id), None)

    def add_shard(self, shard_id: str | None = None) -> ShardLayout:
        """A new shard with fresh ports (``shard-N`` after the highest N when no name is given)."""
        if shard_id is None:
            shard_id = next_shard_id(shard.shard_id for shard in self.shards)
        if self.shard(shard_id) is not None:
            raise ValueError(f"the local cluster already has a shard named {shard_id}")
        shard = ShardLayout(shard_id, free_port(), free_port())
        self.shards.append(shard)
        return shard

    @classmethod
    def create(cls, data_dir: Path, proxy_port: int, shard_count: int) -> ClusterLayout:
        layout = cls(
            data_dir=data_dir,
            proxy_port=proxy_port,
            meta_port=free_port(),
            jwt_secret=secrets.token_urlsafe(48),
            admin_token=secrets.token_urlsafe(32),
        )
        for index in range(1, shard_count + 1):
            layout.shards.append(ShardLayout(f"shard-{index}", free_port(), free_port()))
        return layout

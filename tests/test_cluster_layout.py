"""cluster.json: the local cluster's ports and secrets, and what the supervisor hands its processes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from rich.console import Console

from dialogsctl.cluster import ClusterLayout
from dialogsctl.supervisor import Supervisor


def _earlier_version_file(data_dir: Path) -> None:
    """cluster.json as the version before passwords wrote it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "cluster.json").write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "proxy_port": 8080,
                "meta_port": 41234,
                "jwt_secret": "j" * 48,
                "admin_token": "a" * 32,
                "prometheus_port": None,
                "shards": [{"shard_id": "shard-1", "pg_port": 41235, "worker_port": 41236, "retired": False}],
            }
        )
    )
    (data_dir / "cluster.json").chmod(0o600)


def test_secrets_are_generated_once_for_an_earlier_file(tmp_path: Path) -> None:
    """A cluster.json without passwords or internal secret gets them on load, saved 0600, the same after."""
    _earlier_version_file(tmp_path)
    first = ClusterLayout.load(tmp_path)
    assert first is not None
    saved = json.loads((tmp_path / "cluster.json").read_text())
    assert saved["meta_password"] == first.meta_password and len(first.meta_password) >= 24
    assert saved["internal_secret"] == first.internal_secret and len(first.internal_secret) >= 32
    assert saved["shards"][0]["pg_password"] == first.shards[0].pg_password
    assert stat.S_IMODE((tmp_path / "cluster.json").stat().st_mode) == 0o600
    again = ClusterLayout.load(tmp_path)
    assert again is not None
    assert (again.meta_password, again.internal_secret, again.shards[0].pg_password) == (
        first.meta_password,
        first.internal_secret,
        first.shards[0].pg_password,
    )
    assert f":{first.meta_password}@" in again.metadata_dsn


def test_every_server_has_its_own_password(tmp_path: Path) -> None:
    """Metadata and each shard: distinct generated passwords, in their DSNs."""
    layout = ClusterLayout.create(tmp_path, 8080, 3)
    passwords = [layout.meta_password, *(shard.pg_password for shard in layout.shards)]
    assert len(set(passwords)) == 4
    for shard in layout.shards:
        assert f":{shard.pg_password}@127.0.0.1:{shard.pg_port}/" in layout.shard_dsn(shard)


def test_workers_and_proxy_get_the_internal_secret(tmp_path: Path) -> None:
    """Every worker and the proxy are started with DIALOGS_INTERNAL_SECRET from cluster.json."""
    layout = ClusterLayout.create(tmp_path, 8080, 2)
    children = Supervisor(layout, Console(quiet=True)).planned_children()
    assert sorted(child.name for child in children) == ["proxy", "worker shard-1", "worker shard-2"]
    for child in children:
        assert child.env["DIALOGS_INTERNAL_SECRET"] == layout.internal_secret
        assert child.env["DIALOGS_METADATA_DSN"] == layout.metadata_dsn
